"""Queries per second of ``mmembed eval`` on the demo set, without and with the embedding cache.

Three runs of the same evaluation in one process, printed side by side:
``no cache`` (encode everything), ``cache, cold`` (encode and write the cache), ``cache, warm``
(everything read from the cache: only scoring and reports). All runs must give the same scores.
Each timed run includes loading the model and reading the data; one untimed warm-up run on the
first dataset comes first, so that one-off start-up costs do not land on the "no cache" row.

    python tools/bench_eval.py                                  # tiny recipe model, demo set in a temp dir
    python tools/bench_eval.py --model out/final --demo /data/demo --n-eval 200 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory or openclip:ARCH (default: tiny recipe model)")
    ap.add_argument("--recipe", default="recipes/tiny/composed.yaml", help="recipe to build when --model is absent")
    ap.add_argument("--demo", default=None, help="existing demo set folder (default: generate one in a temp dir)")
    ap.add_argument("--n-eval", type=int, default=50, help="queries per task when generating the demo set")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=0)
    a = ap.parse_args()

    from mmembed.eval import run_eval

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.demo:
            data = Path(a.demo) / "eval"
        else:
            from mmembed.data.synthetic import generate

            generate(tmp / "demo", n_train=2, n_eval=a.n_eval)
            data = tmp / "demo" / "eval"
        model = a.model
        if model is None:
            import mmembed

            torch.manual_seed(0)
            mmembed.build_model(a.recipe).save(tmp / "model")
            model = str(tmp / "model")
        first = sorted(p.stem for p in data.iterdir() if p.suffix in (".parquet", ".jsonl"))[0]
        run_eval(model, data, tmp / "warmup", batch_size=a.batch_size, datasets=[first], cache_dir=None, n_examples=0)
        runs = [("no cache", None), ("cache, cold", tmp / "cache"), ("cache, warm", tmp / "cache")]
        rows = []
        for label, cache in runs:
            t0 = time.perf_counter()
            s = run_eval(
                model,
                data,
                tmp / label.replace(", ", "_").replace(" ", "_"),
                batch_size=a.batch_size,
                num_workers=a.num_workers,
                cache_dir=cache,
                n_examples=0,
            )
            wall = time.perf_counter() - t0
            n = sum(d["n"] for d in s["datasets"].values())
            numbers = json.dumps({k: s[k] for k in ("datasets", "overall")}, sort_keys=True)
            rows.append((label, n, s["encode"]["encoded"], s["encode"]["cached"], wall, n / wall, numbers))
    print(f"\nmodel {model}, data {data}, batch size {a.batch_size}, threads {torch.get_num_threads()}")
    print(f"{'run':<13} {'queries':>8} {'encoded':>8} {'cached':>7} {'seconds':>8} {'queries/s':>10}")
    for label, n, enc, cached, wall, qps, _ in rows:
        print(f"{label:<13} {n:>8} {enc:>8} {cached:>7} {wall:>8.2f} {qps:>10.1f}")
    same = len({r[-1] for r in rows}) == 1
    print(f"speed-up of the warm cache over no cache: {rows[2][5] / rows[0][5]:.1f}x; identical scores: {same}")


if __name__ == "__main__":
    main()

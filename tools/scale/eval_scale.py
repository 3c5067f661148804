"""Eval time against the number of query x candidate pairs: 1000 x 100 shared candidates -> 1000 x 1000 (#16).

One classification-style eval set (text queries ``item i``, a shared label set as every row's candidates, the row's
positive first, so the rows list the same labels in different orders) is scored by ``run_eval`` with the tiny recipe
model built offline (seeded, as the tests build it). Pairs grow x10 while distinct inputs grow only x1.8
(1100 -> 2000). Each measurement runs in a fresh process (``torchrun`` for 2 ranks) from a neutral working
directory, each rank on one CPU thread (as each rank has its own device), and reports ``seconds`` of
``scores.json`` (``evaluate`` alone: planning, encoding, scoring; not model loading or reading the files), the
process wall time and the peak memory (``VmHWM``) of rank 0. Rows:

- ``no cache``: every distinct input encoded; ``cached``: the same run again over the cache it wrote (no encoding:
  what is left is planning and scoring, i.e. the part that grows with pairs);
- ``2 ranks / 1 rank`` at the larger size and at 4x its queries, no cache (cost < 1 means faster with 2 ranks).

Each figure is the median of ``--repeat`` runs (3; ``extra.runs_s`` lists them): the runs take well under a second.

``extra.checksum`` is a hash of every score of ``scores.json`` (datasets, means, the examples' scores and margins),
so running this against an older revision shows whether the numbers are identical.

    python tools/scale/eval_scale.py [--quick]        # JSON rows; tools/bench_scale.py prints them as a table

Uses only API that the older code has too (``mmembed.build_model``, ``mmembed.eval.run_eval``), so it can run against
an earlier revision with ``PYTHONPATH=<worktree>`` from a neutral directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_BUILD = r"""
import sys, torch, mmembed
from pathlib import Path
recipe = Path(mmembed.__file__).resolve().parents[1] / "recipes" / "tiny" / "composed.yaml"
torch.manual_seed(0)
mmembed.build_model(str(recipe)).eval().save(sys.argv[1])
"""

_CHILD = r"""
import json, os, sys, time, torch
torch.set_num_threads(1)
t0 = time.perf_counter()
from mmembed.eval import run_eval
model, data, out, cache = sys.argv[1:5]
s = run_eval(model, data, out, batch_size=64, cache_dir=None if cache == "-" else cache)
wall = time.perf_counter() - t0
hwm = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
if int(os.environ.get("RANK", "0")) == 0:
    print("RESULT " + json.dumps({"seconds": s["seconds"], "wall": wall, "peak_mb": hwm, "world": s["world_size"],
                                  "encode": s["encode"]}))
"""


def write_set(folder: Path, n: int, m: int) -> Path:
    """``folder/N24News.jsonl``: ``n`` text queries, each ranked against the same ``m`` labels (positive first)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = [f"label {j} of the shared set" for j in range(m)]
    with open(folder / "N24News.jsonl", "w") as f:
        for i in range(n):
            p = i % m
            cands = [labels[p], *labels[:p], *labels[p + 1 :]]
            row = {"qry_text": f"a news photo of item {i}", "qry_img_path": "", "tgt_text": cands}
            row["tgt_img_path"] = [""] * m
            f.write(json.dumps(row) + "\n")
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(tmp: Path, model: Path, data: Path, out: Path, cache: Path | None, ranks: int = 1) -> dict:
    """One evaluation in a fresh process (``ranks`` > 1: under torchrun); rank 0's figures and the checksum."""
    script = tmp / "child.py"
    script.write_text(_CHILD)
    args = [str(model), str(data), str(out), str(cache) if cache else "-"]
    if ranks == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--nnodes=1"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), cwd=tmp, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"eval ({ranks} rank(s)) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    got = json.loads(lines[-1][len("RESULT ") :])
    got["process_s"] = time.perf_counter() - t0
    got["checksum"] = checksum(out / "scores.json")
    return got


def checksum(path: Path) -> str:
    """Hash of the numbers of a ``scores.json``: every dataset metric, the means and the examples' scores."""
    s = json.loads(path.read_text())
    run_info = {"seconds", "encode"}
    keep: dict = {k: s[k] for k in ("overall", "means", "meta_tasks", "splits") if k in s}
    keep["official_overall"] = s.get("official_overall")
    keep["datasets"] = {}
    for name, d in s["datasets"].items():
        d = {k: v for k, v in d.items() if k not in run_info}
        d["examples"] = [
            {"row": e["row"], "margin": e["margin"], "scores": [c["score"] for c in e["top"]]}
            for e in d.get("examples", [])
        ]
        keep["datasets"][name] = d
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _median(runs: list[dict]) -> dict:
    """The run of median ``seconds`` (sub-second timings on a shared machine); every run must score the same."""
    if len({r["checksum"] for r in runs}) != 1:
        raise RuntimeError(f"repeated evals gave different scores: {[r['checksum'] for r in runs]}")
    got = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    got["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    return got


def measure(quick: bool = False, repeat: int = 3) -> list[dict]:
    """Rows ``{"area": "eval", "what", "work", "cost", "target", "extra"}``; cost = seconds(large) / seconds(small),
    each the median of ``repeat`` runs (``extra.runs_s`` lists them all)."""
    n, small, large = (300, 30, 300) if quick else (1000, 100, 1000)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        subprocess.run([sys.executable, "-c", _BUILD, str(model)], env=_env(), cwd=tmp, check=True)
        data = {m: write_set(tmp / f"data-{m}", n, m) for m in (small, large)}
        cold, warm = {}, {}
        for m in (small, large):
            # cold: each repeat writes a fresh cache; warm: repeats over the last one
            cold[m] = _median(
                [_run(tmp, model, data[m], tmp / f"cold-{m}-{k}", tmp / f"cache-{m}-{k}") for k in range(repeat)]
            )
            last = tmp / f"cache-{m}-{repeat - 1}"
            warm[m] = _median([_run(tmp, model, data[m], tmp / f"warm-{m}-{k}", last) for k in range(repeat)])
            if warm[m]["checksum"] != cold[m]["checksum"]:
                raise RuntimeError(f"{n} x {m}: the cached run gives other scores than the first run")
        for label, got in (("no cache", cold), ("cached", warm)):
            a, b = got[small], got[large]
            out.append(
                {
                    "area": "eval",
                    "what": f"{label}: eval time at {n} x {large} / {n} x {small} pairs (shared candidates)",
                    "work": large / small,
                    "cost": b["seconds"] / a["seconds"],
                    "target": 2.0,  # #16: pairs x10 (distinct inputs x1.8) within 2x
                    "extra": {
                        "seconds": [a["seconds"], b["seconds"]],
                        "runs_s": [a["all_seconds"], b["all_seconds"]],
                        "process_s": [round(a["process_s"], 2), round(b["process_s"], 2)],
                        "peak_mb": [round(a["peak_mb"], 1), round(b["peak_mb"], 1)],
                        "distinct_inputs": [n + small, n + large],
                        "pairs": [n * small, n * large],
                        "encoded": [a["encode"]["encoded"], b["encode"]["encoded"]],
                        "checksum": [a["checksum"], b["checksum"]],
                    },
                }
            )
        # 2 ranks at the spec'd size and at 4x the queries (the collectives' fixed cost against the shared work)
        data[4 * n] = write_set(tmp / "data-wide", 4 * n, large)
        for q, d in ((n, data[large]), (4 * n, data[4 * n])):
            two = _median([_run(tmp, model, d, tmp / f"two-{q}-{k}", None, ranks=2) for k in range(repeat)])
            one = _median([_run(tmp, model, d, tmp / f"one-{q}-{k}", None) for k in range(repeat)])
            out.append(
                {
                    "area": "eval",
                    "what": f"2 ranks / 1 rank: eval time at {q} x {large} pairs, no cache (one CPU thread per rank)",
                    "work": 1.0,
                    "cost": two["seconds"] / one["seconds"],
                    "target": 1.0,  # #16: 2 ranks faster than 1
                    "extra": {
                        "seconds": [one["seconds"], two["seconds"]],
                        "runs_s": [one["all_seconds"], two["all_seconds"]],
                        "process_s": [round(one["process_s"], 2), round(two["process_s"], 2)],
                        "peak_mb_rank0": [round(one["peak_mb"], 1), round(two["peak_mb"], 1)],
                        "world_size": [one["world"], two["world"]],
                        "checksum": [one["checksum"], two["checksum"]],
                        "same_scores": one["checksum"] == two["checksum"]
                        and (q != n or one["checksum"] == cold[large]["checksum"]),
                    },
                }
            )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 queries x 30 -> 300 x 300 instead of 1000 x 100 -> 1000")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    args = ap.parse_args()
    for row in measure(args.quick, max(1, args.repeat)):
        print(json.dumps(row), flush=True)

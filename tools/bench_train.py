"""Training throughput and peak step memory with and without GradCache, printed side by side.

Each setting runs the real training loop (``python -m mmembed.train``) for a few steps in its own
process on the demo data; samples/s and memory come from its ``metrics.jsonl`` (median over the steps
after the first). "step memory" is the peak during a step minus the memory at its start (CPU: peak RSS
via /proc; GPU: CUDA allocator peak), so the model and optimizer state that every setting shares do
not hide the activations.

Target: GradCache at global batch 256 stays within 1.3x the step memory of a plain step at
batch = chunk size.

    python tools/bench_train.py                        # CPU, mid-size model, batch 256 vs chunk 16
    python tools/bench_train.py --precision bf16       # on a GPU machine

Native VLM recipes train at their own settings (LoRA, GradCache); ``--random-init`` builds the recipe's architecture
offline (see ``native_presets.py``) and ``--max-chunk`` doubles the per-device GradCache chunk (the batch that is
resident in memory at once) until a step fails, printing samples/s and memory for each size that fits:

    python tools/bench_train.py --recipe recipes/vlm2vec/qwen2vl_2b.yaml --random-init --precision bf16 \
        --global-batch 128 --chunk 8 --max-chunk 128

``--zero-breakdown`` launches 2 CPU ranks (torchrun, gloo, as tests/multirank does) on the tiny recipe and trains the
same model and data four ways in one run: ZeRO-0 plain, ZeRO-0 + GradCache, ZeRO-3 plain, ZeRO-3 + GradCache, printing
steps/s and samples/s as ratios to ZeRO-0 plain, then where each step's time goes (``bench_train_zero.py``):

    python tools/bench_train.py --zero-breakdown                  # batch 16 per rank, chunk 4, 6 timed steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MID = [
    "model.vision={type: timm, name: vit_small_patch16_224, pretrained: false, image_size: 112}",
    "model.backbone.config.hidden_size=384",
    "model.backbone.config.intermediate_size=1024",
    "model.backbone.config.num_hidden_layers=4",
    "model.backbone.config.num_attention_heads=6",
    "model.backbone.config.num_key_value_heads=2",
    "model.max_length=64",
]


def run(name: str, overrides: list[str], out: Path, env: dict, recipe: str, fail_ok: bool = False) -> dict | None:
    cmd = [sys.executable, "-m", "mmembed.train", str(ROOT / recipe), *overrides]
    cmd.append(f"train.output_dir={out / name}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        if fail_ok:
            lines = proc.stderr.strip().splitlines()
            print(f"{name}: failed ({lines[-1] if lines else proc.returncode})")
            return None
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines()][1:]
    shutil.rmtree(out / name, ignore_errors=True)
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
        "step_mem_mb": max(r["mem_peak_mb"] - r["mem_start_mb"] for r in rows),
        "peak_mb": max(r["mem_peak_mb"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="demo data folder (generated into a temp dir if absent)")
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--tiny", action="store_true", help="the tiny recipe instead of the mid-size model")
    ap.add_argument("--recipe", default="recipes/tiny/composed.yaml")
    ap.add_argument("--random-init", action="store_true", help="native VLM recipes: built-in architecture, no download")
    ap.add_argument("--dtype", help="native VLM recipes: override model.backbone.dtype (float32 / bfloat16)")
    ap.add_argument("--max-chunk", type=int, default=0, help="double the GradCache chunk from --chunk up to this")
    ap.add_argument("--zero-breakdown", action="store_true", help="2 CPU ranks: ZeRO-0/3 x plain/GradCache, per phase")
    if "--zero-breakdown" in sys.argv[1:]:  # its own options: bench_train_zero.py --help
        from bench_train_zero import main as breakdown  # tools/ is on sys.path when run as a script

        breakdown([a for a in sys.argv[1:] if a != "--zero-breakdown"])
        return
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = Path(args.data) if args.data else tmp / "demo"
    if not (data / "train.yaml").is_file():
        from mmembed.data.synthetic import generate

        generate(data, n_train=600, n_eval=12, image_size=112)
    # Large blocks straight from mmap and back to the OS on free, so the process RSS follows live memory and
    # the per-step RSS peak measures activations (glibc would otherwise keep freed blocks and hide them).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    common = [
        f"data.train={data / 'train.yaml'}",
        "data.num_negatives=1",
        "data.num_workers=0",
        f"train.max_steps={args.steps + 1}",
        "train.optimizer=sgd",
        "train.lr=1e-3",
        f"train.precision={args.precision}",
        "train.save_every=0",
        "train.export=false",
        "train.eval_every=0",
    ]
    from mmembed.config import load_recipe
    from mmembed.registry import BACKBONES

    native = BACKBONES.get(load_recipe(args.recipe).model.backbone["type"]).processor == "hf"  # HF-processor VLM
    if native:
        from native_presets import native_overrides  # tools/ is on sys.path when run as a script

        common += native_overrides(args.recipe, args.random_init, args.dtype) + ["data.eval=null"]
    elif args.recipe == "recipes/tiny/composed.yaml" and not args.tiny:
        common += MID
    b, c = args.global_batch, args.chunk
    if args.max_chunk:
        head = f"GradCache chunk (global batch {b})"
        print(f"{head:36s} {'samples/s':>10s} {'step MiB':>10s} {'peak MiB':>10s}")
        while c <= min(args.max_chunk, b):
            extra = [f"train.batch_size={b}", f"train.gradcache_chunk_size={c}"]
            r = run(f"chunk{c}", common + extra, tmp, env, args.recipe, fail_ok=True)
            if r is None:
                break
            print(f"{'chunk ' + str(c):36s} {r['samples_per_s']:10.1f} {r['step_mem_mb']:10.1f} {r['peak_mb']:10.1f}")
            c *= 2
        return
    settings = {
        f"plain, batch {c}": [f"train.batch_size={c}"],
        f"GradCache, batch {b}, chunk {c}": [f"train.batch_size={b}", f"train.gradcache_chunk_size={c}"],
        f"plain, batch {b}": [f"train.batch_size={b}"],
    }
    results = {
        name: run(f"s{i}", common + extra, tmp, env, args.recipe) for i, (name, extra) in enumerate(settings.items())
    }
    print(f"{'setting':32s} {'samples/s':>10s} {'step memory MiB':>16s} {'peak MiB':>10s}")
    for name, r in results.items():
        print(f"{name:32s} {r['samples_per_s']:10.1f} {r['step_mem_mb']:16.1f} {r['peak_mb']:10.1f}")
    small, gc, big = (results[k] for k in settings)
    print(
        f"\nGradCache batch {b} / plain batch {c} step memory: {gc['step_mem_mb'] / small['step_mem_mb']:.2f}x "
        f"(target <= 1.3x); plain batch {b}: {big['step_mem_mb'] / small['step_mem_mb']:.2f}x"
    )
    print(f"GradCache throughput vs plain at batch {b}: {gc['samples_per_s'] / big['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()

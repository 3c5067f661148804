"""Peak host RAM of ``mmembed.load`` (meta-device build + assigned safetensors) against the plain way (random-init
build, then a safetensors load into it), for a saved model of the Qwen2-VL-2B architecture with random weights.

    python tools/bench_load.py [--recipe recipes/vlm2vec/qwen2vl_2b.yaml] [--dtype bfloat16] [--keep DIR]

Each way runs in its own fresh process; the figure is that process's peak RSS (``ru_maxrss``) minus its RSS after
importing mmembed, next to the size of ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

MEASURE = r"""
import json, resource, sys, time
import mmembed
from mmembed.build import build_from_cfg
from mmembed.config import model_cfg_from_dict
from mmembed.io import resolve_model_dir
from safetensors.torch import load_model

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

base = rss_mb()
t0 = time.perf_counter()
if sys.argv[2] == "meta":
    model = mmembed.load(sys.argv[1])
else:
    _, d, w = resolve_model_dir(__import__("pathlib").Path(sys.argv[1]))
    model = build_from_cfg(model_cfg_from_dict(d)).eval()
    load_model(model, str(w), strict=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mb": peak - base, "seconds": time.perf_counter() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/vlm2vec/qwen2vl_2b.yaml")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--keep", default=None, help="save the model here (and reuse it when it exists)")
    args = ap.parse_args()
    from native_presets import native_overrides

    import mmembed

    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench_load_")) / "model"
    if not (folder / "model.safetensors").is_file():
        overrides = native_overrides(args.recipe, random_init=True, dtype=args.dtype)
        mmembed.build_model(ROOT / args.recipe, overrides).save(folder)
    size = (folder / "model.safetensors").stat().st_size / 2**20
    print(f"{args.recipe} ({args.dtype}): model.safetensors {size:.0f} MiB")
    for way in ("plain", "meta"):
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(folder), way], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{way:5s} load: peak +{r['peak_mb']:.0f} MiB ({r['peak_mb'] / size:.2f}x the weights), {r['seconds']:.1f}s"
        )


if __name__ == "__main__":
    main()

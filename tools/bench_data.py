"""Throughput of the full data pipeline: read, decode, transform, tokenize, collate.

    python tools/bench_data.py [--model-recipe recipes/tiny/composed.yaml] [--workers 0 1 2]

Generates the synthetic demo set (or uses ``--data``), builds the model's processor from the recipe
(falls back to a built-in byte-level processor if the model cannot be built), and prints samples/s
for each DataLoader worker count, from parquet (map-style mixing) and from webdataset shards.
The first batch (worker start-up) is timed separately. Decoding and transforms run in the workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmembed.data import build_train_loader  # noqa: E402
from mmembed.data.sample import Side  # noqa: E402
from mmembed.images import ImageTransform  # noqa: E402


class ByteProcessor:
    """Fallback processor: byte tokens, 64 visual tokens per image, 224px transform, pads to longest."""

    placeholder = "<image>"

    def __init__(self, image_size: int = 224, image_tokens: int = 64) -> None:
        self.transform = ImageTransform(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.image_tokens = image_tokens

    def length(self, side: Side) -> int:
        return len((side.instruction or "") + (side.text or "")) + self.image_tokens * len(side.images)

    def __call__(self, sides: list[Side]) -> dict[str, torch.Tensor]:
        seqs = [list(((s.instruction or "") + " " + (s.text or "")).encode())[:512] for s in sides]
        seqs = [[1] * (self.image_tokens * len(s.images)) + q for s, q in zip(sides, seqs)]
        n = max(len(q) for q in seqs)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, q in enumerate(seqs):
            ids[i, n - len(q) :] = torch.tensor(q)
        out = {"input_ids": ids, "attention_mask": (ids != 0).long()}
        images = [im for s in sides for im in s.images]
        if images:
            out["pixel_values"] = torch.stack([self.transform(im) for im in images])
        return out


def make_processor(recipe: str | None) -> tuple[Any, str]:
    try:
        import mmembed

        model = mmembed.build_model(recipe or str(ROOT / "recipes" / "tiny" / "composed.yaml"))
        return model.processor, f"model processor from {recipe or 'recipes/tiny/composed.yaml'}"
    except Exception as e:  # the model side may not be available: still measure the data side
        return ByteProcessor(), f"built-in byte processor ({type(e).__name__}: {str(e)[:80]})"


def bench(loader: Any, steps: int, batch: int) -> tuple[float, float]:
    """(first-batch seconds, samples/s over the remaining batches)."""
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(steps - 1):
        next(it)
        n += batch
    t2 = time.perf_counter()
    del it
    return t1 - t0, n / max(t2 - t1, 1e-9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-recipe", default=None, help="recipe whose model processor to use")
    ap.add_argument("--data", default=None, help="a data.train spec (default: a fresh synthetic set)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--num-negatives", type=int, default=1)
    ap.add_argument("--no-wds", action="store_true", help="skip the webdataset measurement")
    ap.add_argument("--image-size", type=int, default=64, help="size of the generated synthetic images")
    ap.add_argument("--builtin-processor", type=int, default=0, metavar="PX", help="use the byte processor at PX px")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.builtin_processor:
        processor, how = ByteProcessor(a.builtin_processor), f"built-in byte processor at {a.builtin_processor}px"
    else:
        processor, how = make_processor(a.model_recipe)
    print(f"processor: {how}")
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        if a.data:
            sources["data"] = a.data
        else:
            from mmembed.data.synthetic import generate

            generate(Path(tmp) / "demo", n_train=400, n_eval=12, image_size=a.image_size)
            sources["parquet"] = str(Path(tmp) / "demo" / "train.yaml")
        if not a.no_wds:
            sys.path.insert(0, str(ROOT / "tools"))
            from convert_to_wds import convert

            src = next(iter(sources.values()))
            convert(src, Path(tmp) / "shards", shard_size=100)
            sources["wds"] = str(Path(tmp) / "shards")
        print(f"batch {a.batch_size} queries (+{a.num_negatives} hard negative each), {a.steps} batches per run")
        print(f"{'source':8s} {'workers':>7s} {'first batch s':>14s} {'samples/s':>10s}")
        for name, spec in sources.items():
            for nw in a.workers:
                cfg = {"train": spec, "num_workers": nw, "num_negatives": a.num_negatives, "shuffle_buffer": 100}
                loader = build_train_loader(cfg, processor, global_batch_size=a.batch_size, max_steps=a.steps)
                first, rate = bench(loader, a.steps, a.batch_size)
                print(f"{name:8s} {nw:7d} {first:14.2f} {rate:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

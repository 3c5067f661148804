"""``make demo``: the main job, end to end on CPU in a few minutes.

1. write the built-in demo data (rendered scenes in MMEB format) to ``data/demo`` if it is not there;
2. train ``recipes/tiny/demo.yaml`` VLM2Vec-style under the DeepSpeed engine (one CPU process);
3. score the held-out split: hit@1 per task against its chance level, before and after training;
4. ``mmembed.load`` the exported model and encode a new example.

    python -m mmembed.demo [--recipe recipes/tiny/demo.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mmembed
from mmembed.config import ConfigError, load_recipe
from mmembed.data import build_eval_sets
from mmembed.data.synthetic import Scene, generate, render
from mmembed.eval import evaluate
from mmembed.train.loop import train


def _table(meta: dict, before: dict, after: dict) -> str:
    rows = ["| task | meta-task | chance | hit@1 untrained | hit@1 trained |", "|---|---|---|---|---|"]
    for name, info in sorted(meta["tasks"].items(), key=lambda kv: (kv[1]["meta_task"], kv[0])):
        b, a = before["datasets"][name]["hit@1"], after["datasets"][name]["hit@1"]
        rows.append(f"| {name} | {info['meta_task']} | {info['chance']:.3f} | {b:.3f} | {a:.3f} |")
    chance = float(np.mean([t["chance"] for t in meta["tasks"].values()]))
    rows.append(f"| **mean** | | {chance:.3f} | {before['mean_hit@1']:.3f} | {after['mean_hit@1']:.3f} |")
    return "\n".join(rows)


def _new_example(model: mmembed.EmbeddingModel) -> None:

    scene = Scene(shape="star", color="purple", size="large", position="right")
    image = render(scene, 64, np.random.default_rng(12345))
    captions = [
        "a large purple star on the right",
        "a large purple star on the left",
        "a large green star on the right",
        "a large purple circle on the right",
        "a small orange square at the top",
    ]
    img = model.encode(images=[image], instruction="Represent the given image.")
    txt = model.encode(texts=captions, instruction="Represent the given caption.")
    scores = model.similarity(img, txt)[0]
    print("\nA new image (a large purple star on the right) against five captions, trained model:")
    for i in np.argsort(-scores):
        print(f"  {scores[i]:+.3f}  {captions[i]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny/demo.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"mmembed: config error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    data_root = Path(cfg.data.eval).parent
    if not (data_root / "meta.json").is_file():
        print(f"writing the demo data to {data_root} ...")
        generate(data_root, n_train=1000, n_eval=200, seed=0, image_size=64)
    meta = json.loads((data_root / "meta.json").read_text())

    torch.manual_seed(cfg.train.seed)
    untrained = mmembed.build_model(cfg.model)
    sets = build_eval_sets(cfg.data, untrained.processor.placeholder)
    before = evaluate(untrained, sets, batch_size=64)
    del untrained

    print(f"training {args.recipe} for {cfg.train.max_steps} steps under the DeepSpeed engine ...")
    result = train(cfg)
    model = mmembed.load(result.final_dir)
    after = evaluate(model, sets, batch_size=64)

    print(f"\nHeld-out hit@1 ({sum(len(v) for v in sets.values())} queries, each ranked against its own candidates):\n")
    print(_table(meta, before, after))
    _new_example(model)
    print(f"\nmodel: {result.final_dir}  curve: {result.output_dir / 'loss.png'}  ({time.time() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""2-rank worker: the real training loop with and without GradCache on ZeRO stages 0, 2, 3.

For each stage, one SGD step (hard negatives present, no clipping) is trained twice from the same
initial weights: ``gradcache_chunk_size=0`` and ``=2``. Rank 0 writes, per stage, the max relative
difference of the two weight updates. Run under torchrun from tests/multirank/test_train_multirank.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmembed import dist
from mmembed.build import build_from_cfg
from mmembed.config import load_recipe
from mmembed.train.loop import train

OUT = Path(os.environ["MMEMBED_TEST_OUT"])
DATA = Path(os.environ["MMEMBED_TEST_DATA"])
REPO = Path(__file__).resolve().parents[2]


def recipe(stage: int, chunk: int):
    return load_recipe(
        REPO / "recipes/tiny/composed.yaml",
        [
            f"data.train={DATA / 'train.yaml'}",
            "data.num_negatives=1",
            "model.max_length=48",
            f"train.output_dir={OUT / f'z{stage}_gc{chunk}'}",
            "train.max_steps=1",
            "train.batch_size=4",
            "train.optimizer=sgd",
            "train.lr=0.5",
            "train.grad_clip=0.0",
            "train.warmup_steps=0",
            "train.schedule=constant",
            f"train.zero_stage={stage}",
            f"train.gradcache_chunk_size={chunk}",
        ],
    )


def main() -> None:
    stages = [int(s) for s in sys.argv[1:]] or [0, 2, 3]
    cfg0 = recipe(0, 0)
    torch.manual_seed(cfg0.train.seed)  # the loop builds the model right after this same seeding
    init = {k: v.detach().clone() for k, v in build_from_cfg(cfg0.model).state_dict().items()}
    result = {}
    for stage in stages:
        runs = {}
        for chunk in (0, 2):
            res = train(recipe(stage, chunk))
            runs[chunk] = res
        if dist.get_rank() == 0:
            a = load_file(runs[0].final_dir / "model.safetensors")
            b = load_file(runs[2].final_dir / "model.safetensors")
            num = max(float((b[k] - a[k]).abs().max()) for k in a)
            den = max(float((a[k] - init[k]).abs().max()) for k in a)
            result[f"zero{stage}"] = {
                "max_rel_update_diff": num / den,
                "max_update": den,
                "loss_plain": runs[0].losses[0],
                "loss_gradcache": runs[2].losses[0],
            }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"train_loop.rank{dist.get_rank()}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

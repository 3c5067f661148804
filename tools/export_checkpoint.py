"""Turn a DeepSpeed training checkpoint (any ZeRO stage, 3 included) into an mmembed model directory.

    python tools/export_checkpoint.py runs/demo/checkpoints/step_200 out/model-step200 [--recipe config.yaml]

The recipe defaults to the run's resolved ``config.yaml`` (two folders above the checkpoint). The checkpoint is
verified against its manifest, ZeRO shards are consolidated with DeepSpeed's own ``zero_to_fp32`` into full fp32
weights, LoRA adapters are merged; the result loads with ``mmembed.load``. Everything is read through a loader that
runs no pickle code (:mod:`mmembed.train.safe_load`); the model directory written is safetensors only. The work is
:func:`mmembed.train.export.export_checkpoint`, the same path the training loop exports with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmembed.config import ConfigError
from mmembed.train.export import export_checkpoint
from mmembed.train.safe_load import CheckpointError

export = export_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a checkpoint folder, e.g. runs/x/checkpoints/step_200")
    ap.add_argument("out", type=Path, help="the model directory to write")
    ap.add_argument("--recipe", type=Path, default=None, help="defaults to <run>/config.yaml")
    args = ap.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.recipe)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"export_checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

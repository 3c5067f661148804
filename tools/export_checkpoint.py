"""Turn a DeepSpeed training checkpoint (any ZeRO stage, 3 included) into an mmembed model directory.

    python tools/export_checkpoint.py runs/demo/checkpoints/step_200 out/model-step200 [--recipe config.yaml]

The recipe defaults to the run's resolved ``config.yaml`` (two folders above the checkpoint). ZeRO
shards are consolidated with DeepSpeed's own ``zero_to_fp32`` into full fp32 weights; LoRA adapters
are merged; the result loads with ``mmembed.load``. DeepSpeed checkpoints are torch pickles written by
your own run: this tool reads them with ``weights_only=True`` where DeepSpeed allows it; the model
directory it writes is safetensors only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmembed.build import build_from_cfg
from mmembed.config import ConfigError, load_recipe
from mmembed.io import save_model
from mmembed.train.checkpoint import MARKER, TAG
from mmembed.train.setup import apply_lora, merge_lora


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the engine's module (``model.*`` and ``loss.*`` keys)."""
    tag_dir = checkpoint / TAG
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no DeepSpeed '{TAG}/' folder (is this an mmembed checkpoint?)")
    if list(tag_dir.glob("*optim_states.pt")) and any("zero" in p.name for p in tag_dir.iterdir()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    # ZeRO stage 0: the full module state sits in the model-states file
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no model states file")
    try:
        blob = torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception:  # older DeepSpeed metadata types: this is the user's own run's file
        blob = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}


def export(checkpoint: Path, out: Path, recipe: Path | None = None) -> Path:
    """Write the model directory for ``checkpoint`` to ``out``."""
    if not (checkpoint / MARKER).is_file():
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no {MARKER} marker)")
    recipe = recipe or checkpoint.parent.parent / "config.yaml"
    cfg = load_recipe(recipe)
    state = consolidated_state_dict(checkpoint)
    model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    model = build_from_cfg(cfg.model)
    if cfg.train.lora:
        apply_lora(model, cfg.train.lora)
    model.load_state_dict(model_state, strict=True)
    merge_lora(model)
    return save_model(model.eval(), out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a checkpoint folder, e.g. runs/x/checkpoints/step_200")
    ap.add_argument("out", type=Path, help="the model directory to write")
    ap.add_argument("--recipe", type=Path, default=None, help="defaults to <run>/config.yaml")
    args = ap.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.recipe)
    except (ConfigError, FileNotFoundError) as e:
        print(f"export_checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

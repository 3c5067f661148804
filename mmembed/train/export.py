"""One export path: full weights (gathered under ZeRO-3, or consolidated from a checkpoint), LoRA merged, written
as a self-describing model directory (:func:`mmembed.io.save_model`).

Used by the training loop at the end of a run and for ``best/`` (:func:`export_engine`), and by
``tools/export_checkpoint.py`` for any saved checkpoint (:func:`export_checkpoint`). Checkpoints are verified
against their manifest and read through the restricted loader (:mod:`mmembed.train.safe_load`): no pickle payload
runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmembed import dist
from mmembed.build import build_from_cfg
from mmembed.config import RecipeCfg, load_recipe
from mmembed.io import save_model
from mmembed.train.checkpoint import MARKER, TAG, verify_checkpoint
from mmembed.train.deepspeed_utils import gathered_state_dict
from mmembed.train.safe_load import CheckpointError, restricted_torch_load
from mmembed.train.setup import apply_lora, merge_lora

__all__ = ["export_state", "export_engine", "export_checkpoint", "consolidated_state_dict"]


def export_state(cfg: RecipeCfg, state: dict[str, torch.Tensor], out: Path) -> Path:
    """A fresh model of ``cfg`` (with its LoRA adapters) loaded strictly with ``state`` in fp32, LoRA merged, saved."""
    model = build_from_cfg(cfg.model)
    if cfg.train.lora:
        apply_lora(model, cfg.train.lora)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    merge_lora(model)
    dims = cfg.loss.get("matryoshka_dims")  # written to the model directory and its card (mmembed.io.save_model)
    model.matryoshka_dims = tuple(sorted(dims, reverse=True)) if dims else None
    return save_model(model.eval(), out)


def export_engine(task: Any, cfg: RecipeCfg, out: Path, report: Callable[[str], None] | None = None) -> Path | None:
    """Gather the training model's full weights (collective: every rank calls it) and export them on rank 0.

    Rank 0 reports one line, ``exported runs/demo/final (2.1 MB) in 0.8s``, through ``report`` (the training
    loop passes its logger, so a progress bar is not broken) or on stderr.
    """
    start = time.perf_counter()
    state = gathered_state_dict(task.model)
    path = export_state(cfg, state, out) if dist.get_rank() == 0 else None
    if path is not None:
        size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        line = f"exported {path} ({_size(size)}) in {time.perf_counter() - start:.1f}s"
        (report or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
    dist.barrier()
    return path


def _size(n: int) -> str:
    """``512 B``, ``3.4 KB``, ``2.1 MB``, ``1.3 GB`` (powers of 1000, as file managers show them)."""
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "KB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the engine's module (``model.*`` and ``loss.*`` keys)."""
    tag_dir = checkpoint / TAG
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no DeepSpeed '{TAG}/' folder (is this an mmembed checkpoint?)")
    if list(tag_dir.glob("*optim_states.pt")) and any("zero" in p.name for p in tag_dir.iterdir()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with restricted_torch_load():  # zero_to_fp32 itself calls torch.load(weights_only=False)
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    # ZeRO stage 0: the full module state sits in the model-states file
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no model states file")
    with restricted_torch_load():
        blob = torch.load(files[0], map_location="cpu")
    if not isinstance(blob, dict) or not isinstance(blob.get("module"), dict):
        raise CheckpointError(f"{files[0]}: no 'module' state dict in this model-states file")
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}


def export_checkpoint(checkpoint: Path, out: Path, recipe: Path | None = None) -> Path:
    """Write the model directory for ``checkpoint`` to ``out``."""
    if not (checkpoint / MARKER).is_file():
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no {MARKER} marker)")
    problem, legacy = verify_checkpoint(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{checkpoint} failed verification: {problem}")
    if legacy:
        print(
            f"export: {checkpoint} has no MANIFEST.json (older checkpoint): checked its structure only",
            file=sys.stderr,
        )
    recipe = recipe or checkpoint.parent.parent / "config.yaml"
    cfg = load_recipe(recipe)
    state = consolidated_state_dict(checkpoint)
    model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return export_state(cfg, model_state, out)

"""Atomic training checkpoints: DeepSpeed engine state + the run's own state, written under a
temporary name and renamed only when every rank has finished, so a half-written one is never picked.

Layout: ``<output_dir>/checkpoints/step_<N>/`` holding DeepSpeed's ``state/`` folder (model,
optimizer, scheduler; ZeRO shards per rank), ``trainer_state.json`` (step, data position, loss
history length) and ``skips_rank<R>.json`` (each rank's bad-sample counter). ``COMPLETE`` marks it
finished. Dropout randomness is reseeded from (seed, step, rank) at every step, so no generator
state has to travel: a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mmembed import dist

__all__ = ["save_checkpoint", "find_checkpoint", "load_checkpoint", "TAG"]

TAG = "state"
MARKER = "COMPLETE"


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MARKER).is_file() and _step_of(p) >= 0]
    return sorted(found, key=_step_of)


def find_checkpoint(resume: str, root: Path) -> Path | None:
    """``train.resume``: ``none`` -> None; ``auto`` -> the newest complete checkpoint (or None); else a path."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete mmembed checkpoint (no {MARKER})")
    return path


def save_checkpoint(
    engine: Any, root: Path, step: int, state: dict[str, Any], skips: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint ``step_<step>`` atomically (collective: call on every rank)."""
    rank = dist.get_rank()
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, client_state={"mmembed": state}, save_latest=False)
    (tmp / f"skips_rank{rank}.json").write_text(json.dumps(skips))
    dist.barrier()
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        (tmp / MARKER).write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the engine from ``path``; return the run state and this rank's skip counter."""
    _, client = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    state = json.loads((path / "trainer_state.json").read_text())
    skips_file = path / f"skips_rank{dist.get_rank()}.json"
    skips = json.loads(skips_file.read_text()) if skips_file.is_file() else {}
    if client is None:
        raise RuntimeError(f"{path}: DeepSpeed found no engine state to load")
    return state, skips

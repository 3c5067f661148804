"""Fixtures for training tests: a small generated demo set and a tiny training recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_overrides(data: Path, out: Path, **extra) -> list[str]:
    """A tiny, fast training setup on ``data``; ``extra`` adds ``key=value`` pairs."""
    base = {
        "data.train": str(data / "train.yaml"),
        "data.eval": str(data / "eval"),
        "data.num_workers": 0,
        "data.num_negatives": 1,
        "model.max_length": 48,
        "train.output_dir": str(out),
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.lr": 1e-3,
        "train.warmup_steps": 0,
        "train.save_every": 0,
        "train.eval_every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_train(overrides: list[str], env_extra: dict | None = None, launcher: list[str] | None = None, timeout=300):
    """``python -m mmembed.train`` (or a launcher) on the tiny recipe in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "mmembed.train", str(ROOT / "recipes/tiny/composed.yaml"), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)

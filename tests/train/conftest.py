"""Fixtures for training tests: a small generated demo set and a tiny training recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small rendered-scenes set in MMEB format (train manifest + eval parquet files)."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mmembed.data.synthetic",
            "--out",
            str(out),
            "--n-train",
            "60",
            "--n-eval",
            "12",
            "--image-size",
            "32",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return out


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory) -> str:
    """One DeepSpeed op cache per test run (shared by all launches; never shared across torch versions)."""
    path = os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_ext"))
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    return path


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

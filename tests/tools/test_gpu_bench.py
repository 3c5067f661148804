"""tools/gpu/bench.sh runs end to end in its --dry-run mode (tiny model, CPU), so the GPU script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_bench_dry_run_reports_every_figure(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    out = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu" / "bench.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    enc = report["encode images/s"]
    for key in (
        "plain transformers forward",
        "mmembed model(batch)",
        "mmembed model.encode (end to end)",
        "mmembed model(batch), AIM merge 0.5 + prune",
    ):
        assert enc[key] > 0, key
    train = report["train"]
    assert train["chunk"] == 4 and train["mmembed samples/s"] > 0 and train["plain loop samples/s"] > 0
    assert train["model TFLOP/step"] > 0
    assert "| samples/s |" in out.stdout

"""The real training loop on 2 CPU ranks: GradCache exactness on ZeRO 0/2/3, and 2 ranks x B == 1 rank x 2B.

The first test launches the loop with torchrun; the second uses DeepSpeed's own launcher
(``deepspeed --num_gpus 2 --module mmembed.train``; DeepSpeed 0.19.8's launcher spells ``-m`` as
``--module``) exactly as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.multirank.test_multirank import REPO, _free_port, launch

pytestmark = pytest.mark.dist

TOL = 1e-5


@pytest.fixture(scope="module")
def extensions_dir(torch_extensions_dir: str) -> Path:
    return Path(torch_extensions_dir)


def test_gradcache_in_the_training_loop_is_exact_on_zero_0_2_3(tmp_path, demo_data, extensions_dir, monkeypatch):
    monkeypatch.setenv("MMEMBED_TEST_DATA", str(demo_data))
    results = launch("_worker_train_loop.py", "train_loop", tmp_path, extensions_dir, timeout=540)
    res = results[0]
    assert set(res) == {"zero0", "zero2", "zero3"}
    for stage, r in res.items():
        assert r["max_update"] > 1e-4, f"{stage}: the step changed nothing, the comparison proves nothing"
        assert r["max_rel_update_diff"] <= TOL, f"{stage}: GradCache update differs: {r}"
        assert abs(r["loss_plain"] - r["loss_gradcache"]) <= 1e-5 * max(1.0, abs(r["loss_plain"]))


def _cli_overrides(data: Path, out: Path, batch: int) -> list[str]:
    return [
        f"data.train={data / 'train.yaml'}",
        "data.num_negatives=1",
        "model.max_length=48",
        f"train.output_dir={out}",
        "train.max_steps=1",
        f"train.batch_size={batch}",
        "train.optimizer=sgd",
        "train.lr=0.5",
        "train.grad_clip=0.0",
        "train.warmup_steps=0",
        "train.schedule=constant",
    ]


@pytest.mark.slow  # 2 ranks through the loop are also held exact by the GradCache test above (make test-all)
def test_two_ranks_with_batch_b_equal_one_rank_with_2b(tmp_path, demo_data, extensions_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    recipe = str(REPO / "recipes/tiny/composed.yaml")
    one = subprocess.run(
        [sys.executable, "-m", "mmembed.train", recipe, *_cli_overrides(demo_data, tmp_path / "one", 8)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    two = subprocess.run(
        [*launcher, "--module", "mmembed.train", recipe, *_cli_overrides(demo_data, tmp_path / "two", 4)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=400,
    )
    final = tmp_path / "two" / "final" / "model.safetensors"
    assert final.exists(), f"exit {two.returncode}\n{two.stdout[-3000:]}\n{two.stderr[-3000:]}"
    loss_one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    loss_two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(loss_one - loss_two) <= 1e-5 * max(1.0, abs(loss_one))
    a, b = load_file(tmp_path / "one" / "final" / "model.safetensors"), load_file(final)
    torch.manual_seed(0)
    from mmembed.build import build_model

    init = build_model(recipe, ["model.max_length=48"]).state_dict()
    num = max(float((a[k] - b[k]).abs().max()) for k in a)
    den = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert den > 1e-4 and num / den <= TOL, (num, den)

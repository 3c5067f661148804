"""``mmembed eval`` under torchrun with 2 CPU ranks gives the same scores.json numbers as 1 process.

Judged by the result files, not the launcher's exit code (tests/multirank/test_multirank.py explains why).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmembed.cli import main
from tests.eval.helpers import scores_without_run_info

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_eval(args: list[str], result: Path, timeout: float = 240) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    log = ""
    for _ in range(3):  # a port taken between choosing and binding it: try another
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "mmembed.cli", "eval", *args]
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            log = proc.communicate(timeout=timeout)[0][-4000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"torchrun eval timed out; log tail:\n{proc.communicate()[0][-4000:]}")
        if result.exists() or "address already in use" not in log.lower():
            break
    assert result.exists(), f"2-rank eval wrote no scores.json; log tail:\n{log}"
    return log


def test_two_ranks_equal_one_rank(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = eval_setup
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["eval", str(model), "--data", str(data), "--out", str(one), "--batch-size", "16", "--no-cache"]) == 0
    _torchrun_eval([str(model), "--data", str(data), "--out", str(two), "--batch-size", "3"], two / "scores.json")
    s2 = json.loads((two / "scores.json").read_text())
    assert s2["world_size"] == 2 and s2["encode"]["encoded"] == 23
    assert scores_without_run_info(two / "scores.json") == scores_without_run_info(one / "scores.json")
    # the cache the 2 ranks wrote (rank 0, gathered) serves a 1-rank rerun completely
    again = tmp_path / "again"
    assert main(["eval", str(model), "--data", str(data), "--out", str(again), "--cache-dir", str(two / "cache")]) == 0
    assert json.loads((again / "scores.json").read_text())["encode"]["encoded"] == 0
    assert scores_without_run_info(again / "scores.json") == scores_without_run_info(one / "scores.json")

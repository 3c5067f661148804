"""What a person running ``mmembed train`` sees and keeps: one run per output folder (refuse, overwrite, resume),
checkpoint rotation, plain log lines without a terminal, ``loss.png`` at every evaluation, export lines.

Four real runs (module fixtures share them); the rest is in-process on fabricated folders and records."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmembed.train import checkpoint as ckpt
from mmembed.train.metrics import MetricsLogger, line_labels, loss_figure
from tests.train.conftest import ROOT, train_overrides

pytestmark = pytest.mark.usefixtures("torch_extensions_dir")

STEP_LINE = re.compile(r"^step (\d+)/(\d+): loss \d+\.\d{4}, lr \d\.\d\de[-+]\d\d, \d+\.\d samples/s, ETA \S+$")
NOISE = re.compile(r"^([WI]\d{4} |\[\d{4}-\d\d-\d\d )")  # torch's C++ log lines and DeepSpeed's logger, not ours

# records the complete checkpoints after every save, to see what rotation keeps while the run goes on
RECORD_CHECKPOINTS = """
import sys
from mmembed.train import checkpoint as ckpt

real = ckpt.save_checkpoint

def recording(engine, root, step, *args, **kwargs):
    path = real(engine, root, step, *args, **kwargs)
    print("CHECKPOINTS", step, " ".join(p.name for p in ckpt.list_checkpoints(root)), flush=True)
    return path

ckpt.save_checkpoint = recording
from mmembed.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""

# the process dies (no exception, no clean-up) in the forward of step 3: after step 2's evaluation
DIE_AT_STEP_3 = """
import os, sys
import mmembed.train.loop as loop

real, calls = loop._forward_backward, []

def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os._exit(17)
    return real(*args, **kwargs)

loop._forward_backward = dying
from mmembed.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _train(overrides: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with pipes (no terminal) and no forced progress mode, as under CI or nohup."""
    env = {k: v for k, v in os.environ.items() if k not in ("MMEMBED_PROGRESS", "TQDM_DISABLE")}
    env["HF_HUB_OFFLINE"] = "1"
    head = ["-c", script] if script else ["-m", "mmembed.train"]
    cmd = [sys.executable, *head, str(ROOT / "recipes/tiny/composed.yaml"), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _names(out: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]


FIRST = {"train.max_steps": 6, "train.save_every": 3, "train.eval_every": 3, "train.log_every": 2}


@pytest.fixture(scope="module")
def first_run(demo_data, tmp_path_factory, torch_extensions_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished run: checkpoints step_3 and step_6, best/, final/, six metrics rows. Copy it, never modify it."""
    out = tmp_path_factory.mktemp("ux") / "run"
    proc = _train(train_overrides(demo_data, out, **FIRST))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _names(out) == ["step_3", "step_6"] and (out / "best").is_dir() and (out / "final").is_dir()
    return out, proc


# ----------------------------------------------------------------------------------------------
# 1. one run per output folder


def test_a_new_run_over_an_earlier_one_is_refused_in_one_line(first_run, demo_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = _train(train_overrides(demo_data, out, **{"train.max_steps": 2}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and not NOISE.match(ln)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("mmembed: config error: train.output_dir: ")
    assert str(out) in lines[0] and "train.resume=auto" in lines[0] and "train.overwrite=true" in lines[0]
    assert "checkpoints/" in lines[0] and "metrics.jsonl" in lines[0]
    # nothing was touched, config.yaml included
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_what_counts_as_an_earlier_run(tmp_path):
    from mmembed.train.loop import _earlier_run

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("x: 1\n")  # what a run that failed to start leaves: not a run
    (out / "versions.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    (out / "checkpoints").mkdir()
    assert _earlier_run(out) == []
    (out / "checkpoints" / "step_2").mkdir()  # any step, complete or not
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "best").mkdir()
    (out / "final").mkdir()
    assert _earlier_run(out) == ["checkpoints/", "metrics.jsonl", "final/", "best/"]


@pytest.fixture(scope="module")
def overwritten(first_run, demo_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The first run's folder (plus a file of the user's) trained over with ``train.overwrite=true``: five steps,
    a checkpoint every step, ``save_total_limit=2``, no evaluation."""
    out = tmp_path_factory.mktemp("ux-over") / "run"
    shutil.copytree(first_run[0], out)
    (out / "notes.txt").write_text("mine")
    (out / "tensorboard").mkdir()
    (out / ".final.old-123").mkdir()  # the previous model of a kill mid-export: the old run's too
    extra = {
        "train.overwrite": "true",
        "train.max_steps": 5,
        "train.save_every": 1,
        "train.save_total_limit": 2,
        "train.eval_every": 0,
    }
    proc = _train(train_overrides(demo_data, out, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_overwrite_removes_the_earlier_run_and_keeps_the_users_files(overwritten):
    out, proc = overwritten
    assert f"train.overwrite=true: removed the earlier run in {out}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "final",
        "loss.png",
        "metrics.jsonl",
        "notes.txt",
        "versions.json",
    ]
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5]
    assert not any(k.startswith("eval/") for r in _rows(out) for k in r)  # no old evaluation rows left
    # rotation: save_every=1, max_steps=5, save_total_limit=2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_5"]
    assert json.loads((out / "checkpoints" / "step_5" / "trainer_state.json").read_text())["step"] == 5


@pytest.mark.slow  # the rotation rule itself is tested in-process below; this is the end-to-end run (make test-all)
def test_resume_auto_continues_and_never_rotates_out_the_checkpoint_it_resumed_from(overwritten, demo_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(overwritten[0], out)
    extra = {"train.resume": "auto", "train.max_steps": 7, "train.save_every": 1, "train.save_total_limit": 1}
    proc = _train(train_overrides(demo_data, out, **extra), script=RECORD_CHECKPOINTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_5'} at step 5" in proc.stderr
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6, 7]
    seen = [ln.split(maxsplit=2)[1:] for ln in proc.stdout.splitlines() if ln.startswith("CHECKPOINTS")]
    # during the run the resumed-from step_5 stays beside the newest one; step_4 goes at the first save
    assert seen == [["6", "step_5 step_6"], ["7", "step_5 step_7"]], proc.stdout
    # a finished run: the newest save_total_limit checkpoints only, no temporaries left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_7"]


def test_rotation_keeps_the_newest_and_the_protected_and_deletes_atomically(tmp_path):
    """In-process with a stand-in engine: limits 2, 0 (keep all) and 1 with a protected checkpoint."""
    from tests.train.test_train_hostile import _Engine

    root = tmp_path / "one" / "checkpoints"
    for step in range(1, 6):
        ckpt.save_checkpoint(_Engine(), root, step, {"step": step}, {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_5"]
    every = tmp_path / "two" / "checkpoints"
    for step in range(1, 4):
        ckpt.save_checkpoint(_Engine(), every, step, {"step": step}, {}, keep=0)
    assert [p.name for p in ckpt.list_checkpoints(every)] == ["step_1", "step_2", "step_3"]
    for step in (4, 5):
        ckpt.save_checkpoint(_Engine(), every, step, {"step": step}, {}, keep=1, protect=every / "step_3")
        assert [p.name for p in ckpt.list_checkpoints(every)] == ["step_3", f"step_{step}"]
    assert ckpt.rotate_checkpoints(every, 1) == [every / "step_3"]
    assert sorted(p.name for p in every.iterdir()) == ["step_5"]  # nothing half-deleted left behind
    # a kill during a deletion leaves only a renamed folder without the name lookups match; clean-up removes it
    doomed = every / ".tmp-step_5.deleting"
    (every / "step_5").rename(doomed)
    assert ckpt.list_checkpoints(every) == [] and ckpt.clean_stale_temporaries(every.parent) == [doomed]


# ----------------------------------------------------------------------------------------------
# 3. and 5. the console without a terminal


def test_without_a_terminal_one_plain_line_every_log_every_steps_and_no_carriage_returns(first_run):
    out, proc = first_run
    text = proc.stdout + proc.stderr
    assert "\r" not in text
    steps = [m for m in map(STEP_LINE.match, text.splitlines()) if m]
    assert [(int(m[1]), int(m[2])) for m in steps] == [(2, 6), (4, 6), (6, 6)], text[-3000:]
    assert [ln for ln in text.splitlines() if ln.startswith("step ") and "/6:" in ln] == [m[0] for m in steps]
    assert steps[-1][0].endswith("ETA 0s")
    assert len(_rows(out)) == 6  # metrics.jsonl still gets every step
    # 5. the exports: where, how big, how long
    exported = [ln for ln in text.splitlines() if ln.startswith("exported ")]
    assert any(
        re.fullmatch(rf"exported {re.escape(str(out / 'final'))} \(\d+\.\d [KMG]B\) in \d+\.\ds", ln) for ln in exported
    )
    assert any(ln.startswith(f"exported {out / 'best'} (") for ln in exported), exported


def test_lines_mode_in_process(tmp_path):
    """Every ``log_every`` steps and at the last one; loss is the mean since the previous line; skipped steps count."""
    stream = io.StringIO()
    log = MetricsLogger(tmp_path, 0, 5, log_every=2, stream=stream, mode="lines")
    for step, loss in [(1, 1.0), (2, 3.0), (3, None), (4, 0.5), (5, 0.25)]:
        if loss is None:
            log.log({"step": step, "skipped_step": True, "reason": "loss is nan"})
        else:
            log.log({"step": step, "loss": loss, "lr": 1e-3, "samples_per_s": 100.0})
    log.close()
    lines = stream.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert lines[0].startswith("step 2/5: loss 2.0000, lr 1.00e-03, 100.0 samples/s, ETA ")
    assert lines[1].startswith("step 4/5: loss 0.5000,")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def test_bar_mode_updates_every_step_with_the_postfix(tmp_path):
    stream = io.StringIO()
    log = MetricsLogger(tmp_path, 0, 3, log_every=10, stream=stream, mode="bar")
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 0.5 * step, "lr": 2e-3, "samples_per_s": 50.0})
    log.message("step 3: held-out hit@1 mean 0.5")
    log.close()
    text = stream.getvalue()
    assert "3/3" in text and "loss 1.5000, lr 2.00e-03, 50.0 samples/s" in text
    assert "step 3: held-out hit@1 mean 0.5\n" in text


# ----------------------------------------------------------------------------------------------
# 4. loss.png


def test_loss_png_is_written_at_the_evaluation_so_a_crashed_run_has_its_plot(demo_data, tmp_path):
    out = tmp_path / "run"
    proc = _train(
        train_overrides(demo_data, out, **{"train.max_steps": 4, "train.eval_every": 2}), script=DIE_AT_STEP_3
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert not (out / "final").exists()
    png = out / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    tasks = sorted(k[5:-6] for k in rows[1] if k.endswith("/hit@1") and not k.startswith("eval/select/"))
    assert tasks and all(0 < rows[1][f"eval/{t}/chance"] < 1 for t in tasks)  # the chance level is recorded
    labels = line_labels(loss_figure(rows))
    expected = ["train loss", "smoothed", "lr"] + [f"{t} {kind}" for t in tasks for kind in ("hit@1", "chance")]
    assert sorted(labels) == sorted(expected)
    assert not list(out.glob(".loss.png.tmp-*"))


def test_loss_figure_lines_title_and_legends():
    rows = [{"step": s, "loss": 2.0 / s, "lr": 1e-3 * s} for s in range(1, 41)]
    rows[9].update({"eval/a/hit@1": 0.4, "eval/a/chance": 0.25, "eval/b/hit@1": 0.2, "eval/b/chance": 0.1})
    rows[9]["eval/select/a/hit@1"] = 0.4  # the selection metric is not a task
    rows[39].update({"eval/a/hit@1": 0.6, "eval/a/chance": 0.25, "eval/b/hit@1": 0.3, "eval/b/chance": 0.1})
    rows.insert(5, {"step": 6, "skipped_step": True, "reason": "loss is nan"})
    fig = loss_figure(rows, title="run demo")
    labels = line_labels(fig)
    assert sorted(labels) == sorted(["train loss", "smoothed", "lr", "a hit@1", "a chance", "b hit@1", "b chance"])
    assert fig.get_suptitle() == "run demo"
    assert all(ax.get_legend() is not None for ax in (fig.axes[0], fig.axes[1]))
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert lines["a chance"].get_linestyle() == "--" and list(lines["a chance"].get_ydata()) == [0.25, 0.25]
    raw, smooth = lines["train loss"].get_ydata(), lines["smoothed"].get_ydata()
    assert len(raw) == len(smooth) == 40 and smooth[0] == raw[0] and smooth[-1] > raw[-1]  # lags a falling loss
    assert loss_figure([{"step": 1, "skipped_step": True}]) is None

"""Hostile and broken inputs to the training loop: checkpoints that try to run code, corrupt checkpoints, a full
disk, a failing evaluation, skipped steps. Each fixture is built here; one real run produces the checkpoints."""

from __future__ import annotations

import collections
import errno
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmembed.train import checkpoint as ckpt
from mmembed.train.safe_load import CheckpointError, UnsafeCheckpointError, allowed_globals
from tests.train.conftest import ROOT, run_train, train_overrides

pytestmark = pytest.mark.usefixtures("torch_extensions_dir")

STEPS = {"train.max_steps": 4, "train.save_every": 2, "train.batch_size": 2, "data.num_negatives": 0}
MODEL_STATES = "state/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def run_dir(demo_data, tmp_path_factory, torch_extensions_dir) -> Path:
    """One real run (ZeRO 0) with checkpoints step_2 and step_4 and a final model; copy it, never modify it."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    proc = run_train(train_overrides(demo_data, out, **STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_2", "step_4"]
    return out


def _copy(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst)
    shutil.rmtree(dst / "final")
    return dst


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _plant_payload(step_dir: Path, marker: Path, rel: str = MODEL_STATES, update_manifest: bool = True) -> Path:
    """Replace ``rel`` with a torch file that runs code when unpickled; re-sign the manifest as an attacker could."""
    target = step_dir / rel
    torch.save({"module": {"w": torch.zeros(2)}, "evil": _Payload(marker)}, target)
    if update_manifest:
        _resign(step_dir, rel)
    else:
        (step_dir / ckpt.MANIFEST).unlink()
    return target


def _resign(step_dir: Path, rel: str) -> None:
    manifest = step_dir / ckpt.MANIFEST
    data = json.loads(manifest.read_text())
    file = step_dir / rel
    data["files"][rel] = {"size": file.stat().st_size, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    manifest.write_text(json.dumps(data))


def _as_zero_model_states(step_dir: Path) -> None:
    """Give the ZeRO-0 model-states file the parameter shapes a ZeRO 1-3 one has, so that DeepSpeed's
    zero_to_fp32 reads it and goes on to the optimizer shard (saves training a ZeRO run for this test)."""
    file = step_dir / MODEL_STATES
    sd = torch.load(file, map_location="cpu", weights_only=True)
    sd["param_shapes"] = [{k: v.shape for k, v in sd["module"].items()}]
    sd["shared_params"] = sd.get("shared_params") or {}
    torch.save(sd, file)
    _resign(step_dir, MODEL_STATES)


# ----------------------------------------------------------------------------------------------
# 1. a checkpoint must not run its own code


def test_the_payload_really_runs_under_a_plain_unpickle(tmp_path):
    """Guard for the tests below: the planted file is a working exploit, so "no marker" means something."""
    marker = tmp_path / "marker"
    torch.save({"evil": _Payload(marker)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def test_resume_refuses_a_checkpoint_that_runs_code(run_dir, demo_data, tmp_path):
    out = _copy(run_dir, tmp_path / "run")
    marker = tmp_path / "marker"
    bad = _plant_payload(out / "checkpoints" / "step_4", marker)
    proc = run_train(train_overrides(demo_data, out, **STEPS, **{"train.resume": "auto"}))
    assert not marker.exists(), "the checkpoint ran its own code"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "mmembed: checkpoint error" in proc.stderr and str(bad) in proc.stderr
    assert "refused to unpickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "final").exists()


def test_a_payload_without_manifest_passes_the_structure_check_but_not_the_loader(run_dir, tmp_path):
    out = _copy(run_dir, tmp_path / "run")
    marker = tmp_path / "marker"
    bad = _plant_payload(out / "checkpoints" / "step_4", marker, update_manifest=False)
    notes: list[str] = []
    assert (
        ckpt.find_checkpoint("auto", out / "checkpoints", verify=True, report=notes.append)
        == out / "checkpoints" / "step_4"
    )
    assert any("no MANIFEST.json" in n for n in notes)
    from mmembed.train.safe_load import restricted_torch_load

    original = torch.load
    with restricted_torch_load(), pytest.raises(UnsafeCheckpointError, match="refused") as e:
        torch.load(bad, weights_only=False)  # what DeepSpeed's checkpoint engine calls
    assert str(bad) in str(e.value) and not marker.exists()
    assert torch.load is original  # the patch is undone


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_checkpoint", ROOT / "tools" / "export_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("rel", [MODEL_STATES, "state/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_export_tool_refuses_a_checkpoint_that_runs_code(rel, run_dir, tmp_path):
    """ZeRO 0 (the tool reads the model states itself) and a ZeRO shard (DeepSpeed's zero_to_fp32 reads it)."""
    out = _copy(run_dir, tmp_path / "run")
    marker = tmp_path / "marker"
    if "optim" in rel:
        _as_zero_model_states(out / "checkpoints" / "step_4")
    bad = _plant_payload(out / "checkpoints" / "step_4", marker, rel=rel)
    tool = _export_tool()
    with pytest.raises(UnsafeCheckpointError) as e:
        tool.export(out / "checkpoints" / "step_4", tmp_path / "exported")
    assert str(bad) in str(e.value) and not marker.exists() and not (tmp_path / "exported").exists()
    # the command line: one line, exit 2
    rc = tool.main([str(out / "checkpoints" / "step_4"), str(tmp_path / "exported")])
    assert rc == 2 and not marker.exists()


def test_export_tool_refuses_a_tampered_checkpoint(run_dir, tmp_path):
    out = _copy(run_dir, tmp_path / "run")
    _flip(out / "checkpoints" / "step_4" / MODEL_STATES)
    with pytest.raises(CheckpointError, match="sha256"):
        _export_tool().export(out / "checkpoints" / "step_4", tmp_path / "exported")


def test_allow_list_is_exactly_deepspeeds_metadata_types():
    names = sorted(f"{g.__module__}.{g.__qualname__}" for g in allowed_globals())
    assert names == [
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    ]


# ----------------------------------------------------------------------------------------------
# 2. manifest, verification on resume, fall back


def _flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def _truncate(step: Path) -> str:
    f = step / MODEL_STATES
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "truncated"


def _zero_bytes(step: Path) -> str:
    (step / MODEL_STATES).write_bytes(b"")
    return "0 bytes"


def _bad_json(step: Path) -> str:
    (step / "trainer_state.json").write_text('{"step": 4, "data": ')
    return "trainer_state.json"


def _no_state(step: Path) -> str:
    shutil.rmtree(step / "state")
    return "missing"


def _bit_flip(step: Path) -> str:
    _flip(step / MODEL_STATES)
    return "sha256"


CORRUPTIONS = [_truncate, _zero_bytes, _bad_json, _no_state, _bit_flip]


@pytest.fixture(scope="module")
def resumed_from_step_2(run_dir, demo_data, tmp_path_factory) -> Path:
    """The reference: a copy resumed explicitly from step_2. Its folder also holds what a killed run leaves behind
    (item 3): the temporaries must be gone afterwards, the ``.old`` copy of a previous model kept."""
    out = _copy(run_dir, tmp_path_factory.mktemp("ref") / "run")
    stale = [out / ".final.tmp-abc123", out / ".best.tmp-xyz", out / "checkpoints" / ".tmp-step_6"]
    for p in stale:
        (p / "state").mkdir(parents=True)
        (p / "state" / "junk.pt").write_bytes(b"\0" * 1000)
    (out / ".final.old-123").mkdir()
    proc = run_train(train_overrides(demo_data, out, **STEPS, **{"train.resume": str(out / "checkpoints/step_2")}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints/step_2'} at step 2" in proc.stderr + proc.stdout
    assert not any(p.exists() for p in stale), "stale temporaries were not cleaned"
    assert all(f"removed {p}" in proc.stderr for p in stale)
    assert (out / ".final.old-123").is_dir()
    return out


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_resume_auto_picks_the_previous_checkpoint_past_a_corrupt_newest(corrupt, run_dir, tmp_path):
    """Every kind of damage is caught by the lookup the loop runs (in-process: no training needed)."""
    root = _copy(run_dir, tmp_path / "run") / "checkpoints"
    why = corrupt(root / "step_4")
    lines: list[str] = []
    assert ckpt.find_checkpoint("auto", root, verify=True, report=lines.append) == root / "step_2"
    skipped = [ln for ln in lines if ln.startswith("resume: skipping")]
    assert len(skipped) == 1 and str(root / "step_4") in skipped[0] and why in skipped[0], lines


@pytest.mark.parametrize("corrupt", [_bit_flip, _truncate], ids=["bit_flip", "truncate"])
def test_resume_auto_past_a_corrupt_checkpoint_trains_to_the_same_weights(
    corrupt, run_dir, resumed_from_step_2, demo_data, tmp_path
):
    out = _copy(run_dir, tmp_path / "run")
    step_4 = out / "checkpoints" / "step_4"
    why = corrupt(step_4)
    proc = run_train(train_overrides(demo_data, out, **STEPS, **{"train.resume": "auto"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [ln for ln in proc.stderr.splitlines() if ln.startswith("resume: skipping")]
    assert len(skipped) == 1 and str(step_4) in skipped[0] and why in skipped[0], proc.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints/step_2'} at step 2" in proc.stderr + proc.stdout
    assert _same(_weights(out), _weights(resumed_from_step_2)), "fallback run differs from a resume from step_2"
    assert _same(_weights(out), _weights(run_dir)), "fallback run differs from the uninterrupted run"
    # the re-trained step_4 replaced the corrupt one and verifies
    assert ckpt.verify_checkpoint(step_4) == (None, False)


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_explicit_resume_of_a_corrupt_checkpoint_names_the_file(corrupt, run_dir, tmp_path):
    root = _copy(run_dir, tmp_path / "run") / "checkpoints"
    why = corrupt(root / "step_4")
    with pytest.raises(CheckpointError, match="train.resume") as e:
        ckpt.find_checkpoint(str(root / "step_4"), root, verify=True)
    assert str(root / "step_4") in str(e.value) and why in str(e.value)
    assert ckpt.find_checkpoint(str(root / "step_2"), root, verify=True) == root / "step_2"


def test_explicit_resume_of_a_corrupt_checkpoint_stops_the_cli_in_one_line(run_dir, demo_data, tmp_path):
    out = _copy(run_dir, tmp_path / "run")
    _bit_flip(out / "checkpoints" / "step_4")
    proc = run_train(train_overrides(demo_data, out, **STEPS, **{"train.resume": str(out / "checkpoints/step_4")}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("mmembed: checkpoint error")]
    assert len(line) == 1 and str(out / "checkpoints/step_4" / MODEL_STATES) in line[0] and "sha256" in line[0]


def test_manifest_lists_every_file_and_catches_extra_and_legacy_problems(run_dir, tmp_path):
    root = _copy(run_dir, tmp_path / "run") / "checkpoints"
    step = root / "step_4"
    listed = set(json.loads((step / ckpt.MANIFEST).read_text())["files"])
    assert listed == {MODEL_STATES, "trainer_state.json", "skips_rank0.json"}
    assert ckpt.verify_checkpoint(step) == (None, False)
    (step / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")  # an unlisted shard
    problem, _ = ckpt.verify_checkpoint(step)
    assert problem is not None and "not listed" in problem
    (step / ckpt.MANIFEST).write_text("{not json")
    problem, _ = ckpt.verify_checkpoint(step)
    assert problem is not None and "unreadable manifest" in problem
    # an old checkpoint without a manifest: accepted with a warning, but a bit flip still fails the zip CRCs
    legacy = root / "step_2"
    (legacy / ckpt.MANIFEST).unlink()
    assert ckpt.verify_checkpoint(legacy) == (None, True)
    _flip(legacy / MODEL_STATES)
    problem, legacy_flag = ckpt.verify_checkpoint(legacy)
    assert legacy_flag and problem is not None and "CRC" in problem
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        ckpt.find_checkpoint("auto", root, verify=True, report=lambda _: None)
    assert ckpt.find_checkpoint("auto", root) == root / "step_4"  # without verify: markers only


# ----------------------------------------------------------------------------------------------
# 3. disk full, in-process with a stand-in engine


class _Engine:
    """Writes a DeepSpeed-like folder; ``fail`` makes the write raise mid-way, like a full disk does."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail, self.calls = fail, 0

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        self.calls += 1
        state = Path(save_dir) / tag
        state.mkdir(parents=True)
        (state / "mp_rank_00_model_states.pt").write_bytes(b"\1" * 500)
        if self.fail is not None:
            raise self.fail


_Usage = collections.namedtuple("_Usage", "total used free")


def _previous_checkpoint(root: Path) -> Path:
    ckpt.save_checkpoint(_Engine(), root, 2, {"step": 2}, {})
    assert ckpt.verify_checkpoint(root / "step_2") == (None, False)
    return root / "step_2"


def test_save_refuses_early_when_the_disk_is_too_full(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    prev = _previous_checkpoint(root)
    engine = _Engine()
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: _Usage(10**6, 10**6 - 100, 100))
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        ckpt.save_checkpoint(engine, root, 4, {"step": 4}, {})
    msg = str(e.value)
    assert str(root / ".tmp-step_4") in msg and "100 bytes are free" in msg
    needed = int(sum(p.stat().st_size for p in prev.rglob("*") if p.is_file()) * ckpt.SPACE_MARGIN)
    assert f"needs about {needed} bytes" in msg
    assert engine.calls == 0 and not (root / "step_4").exists()
    assert ckpt.verify_checkpoint(prev) == (None, False)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")],
    ids=["oserror", "torch-writer"],
)
def test_a_failing_save_names_the_checkpoint_and_cleans_up(error, tmp_path):
    root = tmp_path / "checkpoints"
    prev = _previous_checkpoint(root)
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(_Engine(fail=error), root, 4, {"step": 4}, {})
    msg = str(e.value)
    assert str(root / ".tmp-step_4") in msg and str(error) in msg and "bytes free" in msg
    assert not (root / ".tmp-step_4").exists() and not (root / "step_4").exists()
    assert ckpt.list_checkpoints(root) == [prev] and ckpt.verify_checkpoint(prev) == (None, False)


# ----------------------------------------------------------------------------------------------
# 4. a failing evaluation must not kill the run

FAILING_EVAL = """
import json, sys
from pathlib import Path
import mmembed.eval

real, calls = mmembed.eval.eval_in_training, []
out = Path(sys.argv[1])

def flaky(model, sets, **kw):
    calls.append(1)
    if len(calls) == 1:  # the first evaluation fails; report whether this step's checkpoint was already written
        done = (out / "checkpoints" / "step_2" / "COMPLETE").exists()
        raise RuntimeError(f"injected eval failure (checkpoint_written={done})\\nsecond line, not logged")
    return real(model, sets, **kw)

mmembed.eval.eval_in_training = flaky
from mmembed.train.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_failing_eval_is_logged_and_the_run_goes_on(demo_data, tmp_path):
    """The first evaluation fails (injected); the second runs on an eval set whose image file holds non-image bytes,
    which is a counted miss: the run ends with its checkpoints, both evaluations are in metrics.jsonl."""
    eval_dir = tmp_path / "eval"
    shutil.copytree(demo_data / "eval", eval_dir)
    victim = sorted((eval_dir / "images").iterdir())[0]
    victim.write_bytes(b"this is not an image\n" * 20)
    out = tmp_path / "run"
    args = train_overrides(demo_data, out, **STEPS, **{"train.eval_every": 2, "data.eval": str(eval_dir)})
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_EVAL, str(out), str(ROOT / "recipes/tiny/composed.yaml"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3, 4]
    # one line, and step 2's checkpoint was on disk before the evaluation started
    assert rows[2]["eval/error"] == "RuntimeError: injected eval failure (checkpoint_written=True)"
    assert "eval/mean_hit@1" not in rows[2] and "eval/mean_hit@1" in rows[4] and "eval/error" not in rows[4]
    line = (
        "step 2: evaluation failed, training continues: RuntimeError: injected eval failure (checkpoint_written=True)\n"
    )
    assert line in proc.stdout + proc.stderr
    assert "row(s) with an unreadable image, scored as misses" in proc.stdout + proc.stderr  # the corrupt image
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_2", "step_4"]
    assert json.loads((out / "best" / "selection.json").read_text())["step"] == 4
    assert (out / "final" / "model.safetensors").is_file()

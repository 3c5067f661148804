"""The training loop on one CPU process under the DeepSpeed engine: outputs, export, resume, bad settings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmembed
from tests.train.conftest import ROOT, run_train, train_overrides

pytestmark = pytest.mark.usefixtures("torch_extensions_dir")


def test_train_writes_outputs_and_the_export_reloads(demo_data, tmp_path):
    out = tmp_path / "run"
    proc = run_train(train_overrides(demo_data, out, **{"train.eval_every": 2, "train.save_every": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"metrics.jsonl", "final", "checkpoints", "config.yaml", "versions.json", "loss.png"} <= names
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "lr", "samples_per_s", "skipped"} <= set(r) and np.isfinite(r["loss"])
    assert "eval/mean_hit@1" in rows[1] and "eval/mean_hit@1" in rows[3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    best = json.loads((out / "best" / "selection.json").read_text())
    assert best["metric"] == "overall" and best["step"] in (2, 4)
    assert best["value"] == max(r["eval/overall"] for r in rows if "eval/overall" in r)
    assert mmembed.load(out / "best").embed_dim == 64
    model = mmembed.load(out / "final")
    emb = model.encode(texts=["a red circle"], images=[None])
    assert emb.shape == (1, 64) and np.isfinite(emb).all()
    start = mmembed.build_model(ROOT / "recipes/tiny/composed.yaml", ["model.max_length=48"])
    trained = load_file(out / "final" / "model.safetensors")
    moved = [k for k, v in start.state_dict().items() if not torch.equal(v, trained[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("connector.") for k in moved)


def _weights(path):
    return load_file(path / "final" / "model.safetensors")


def _losses(path):
    return [json.loads(ln)["loss"] for ln in (path / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_and_resume_matches_an_uninterrupted_run(demo_data, tmp_path):
    steps = {"train.max_steps": 6, "train.save_every": 2, "train.optimizer": "adamw"}
    ref = tmp_path / "ref"
    proc = run_train(train_overrides(demo_data, ref, **steps))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "mmembed.train",
        str(ROOT / "recipes/tiny/composed.yaml"),
        *train_overrides(demo_data, out, **steps),
    ]
    victim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "step_4" / "COMPLETE").exists():
        if victim.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-run: after step 4's checkpoint, during steps 5-6
    victim.wait()
    assert not (out / "final").exists()
    resumed = run_train(train_overrides(demo_data, out, **steps, **{"train.resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert _losses(ref) == _losses(out)


def test_half_written_checkpoint_is_never_picked(tmp_path):
    from mmembed.train.checkpoint import find_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step_2").mkdir(parents=True)
    (root / "step_2" / "COMPLETE").write_text("{}")
    (root / "step_4").mkdir()  # no marker: interrupted while writing
    (root / ".tmp-step_6").mkdir()
    assert find_checkpoint("auto", root) == root / "step_2"
    assert find_checkpoint("none", root) is None
    with pytest.raises(FileNotFoundError, match="not a complete"):
        find_checkpoint(str(root / "step_4"), root)


@pytest.mark.parametrize(
    "override, key",
    [
        (["train.gradcache_chunk_size=16", "train.batch_size=8"], "train.gradcache_chunk_size"),
        (["train.zero_stage=4"], "train.zero_stage"),
        (["train.freeze=[vision, connector, backbone, pooler]"], "train.freeze"),
        (["train.lora={r: 4, target_modules: [no_such_proj]}"], "train.lora.target_modules"),
        (["train.lora={r: 4, rank: 3}"], "train.lora.rank"),
        (["train.zero_stage=2", "train.deepspeed=recipes/deepspeed/zero3.json"], "train.zero_stage"),
    ],
)
def test_impossible_settings_fail_at_start_naming_the_key(override, key, demo_data, tmp_path):
    proc = run_train(train_overrides(demo_data, tmp_path / "bad") + override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr and "Traceback" not in proc.stderr


NAN_LOSS = """
import sys, torch
from mmembed.losses import InfoNCELoss
from mmembed.registry import LOSSES

@LOSSES.register("nan_on_steps")
class NanOnSteps(InfoNCELoss):
    example_args = [{}]
    def __init__(self, bad: list = (), **kw):
        super().__init__(**kw)
        self.bad, self.calls = set(bad), 0
    def forward(self, q, t, negative_mask=None, return_stats=False):
        self.calls += 1
        out = super().forward(q, t, negative_mask=negative_mask, return_stats=return_stats)
        if self.calls in self.bad:
            out = (out[0] * float("nan"), out[1]) if return_stats else out * float("nan")
        return out

from mmembed.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("bad, max_bad, expect_rc", [([2, 3], 3, 0), ([2, 3, 4], 3, 1)])
def test_non_finite_loss_skips_the_step_and_stops_after_too_many(bad, max_bad, expect_rc, demo_data, tmp_path):
    out = tmp_path / "nan"
    args = train_overrides(
        demo_data, out, **{"train.max_steps": 5, "train.save_every": 1, "train.max_bad_steps": max_bad}
    ) + [f"loss={{type: nan_on_steps, bad: {bad}}}"]
    proc = subprocess.run(
        [sys.executable, "-c", NAN_LOSS, str(ROOT / "recipes/tiny/composed.yaml"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    assert "step skipped" in proc.stderr + proc.stdout
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if not r.get("skipped_step")]  # steps that trained
    assert 2 not in steps and 3 not in steps and 1 in steps
    skipped = [r for r in records if r.get("skipped_step")]  # skipped steps are recorded too, exactly so
    assert [r["step"] for r in skipped][:2] == [2, 3]
    assert all(r == {"step": r["step"], "skipped_step": True, "reason": "loss is nan"} for r in skipped)
    assert all("loss" in r for r in records if not r.get("skipped_step"))
    if expect_rc == 0:
        assert steps == [1, 4, 5] and (out / "final").is_dir()
    else:
        assert "non-finite losses in a row" in proc.stderr
        assert (out / "checkpoints" / "step_1" / "COMPLETE").exists() and not (out / "final").exists()


def test_gradient_checkpointing_gives_the_same_step(demo_data, tmp_path):
    common = {"train.max_steps": 1, "train.optimizer": "sgd", "train.lr": 0.5, "train.grad_clip": 0.0}
    plain = run_train(train_overrides(demo_data, tmp_path / "plain", **common))
    ckpt = run_train(train_overrides(demo_data, tmp_path / "ckpt", **common, **{"train.gradient_checkpointing": True}))
    assert plain.returncode == 0 and ckpt.returncode == 0, ckpt.stderr[-3000:]
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert _losses(tmp_path / "plain") == pytest.approx(_losses(tmp_path / "ckpt"), abs=1e-6)


def test_micl_loss_is_weighted_in_and_exact_under_gradcache(demo_data, tmp_path):
    """NoteLLM-2 mICL: the loop trains (1 - w) L_main + w L_visual; GradCache caches both representations."""
    imgs = sorted((demo_data / "train" / "images").glob("*.png"))[:16]
    prompt = 'Note: {{"image": "<image>"}}, compress into one word:"<IMG_EMB>". Note: {{"title": "{t}"}}, compress:"'
    rows = [
        {
            "query": {"text": prompt.format(t=f"note {i}"), "image": str(p)},
            "positive": {"text": prompt.format(t=f"similar note {i}"), "image": str(imgs[(i + 1) % len(imgs)])},
        }
        for i, p in enumerate(imgs)
    ]
    data = tmp_path / "notes.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = {
        "data.train": str(data),
        "data.eval": "",
        "data.num_negatives": 0,
        "train.max_steps": 1,
        "train.optimizer": "sgd",
        "train.lr": 0.5,
        "train.grad_clip": 0.0,
        "model.fusion": '{type: late_fusion, micl_token: "<IMG_EMB>", micl_weight: 0.25}',
    }
    plain = run_train(train_overrides(demo_data, tmp_path / "plain", **common))
    gc = run_train(train_overrides(demo_data, tmp_path / "gc", **common, **{"train.gradcache_chunk_size": 2}))
    assert plain.returncode == 0 and gc.returncode == 0, (plain.stderr + gc.stderr)[-3000:]
    row = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    # without the token found, the visual rows fall back to the main ones and the two losses coincide exactly
    assert np.isfinite(row["train/micl_loss"]) and abs(row["train/micl_loss"] - row["loss"]) > 1e-5
    assert _losses(tmp_path / "gc") == pytest.approx(_losses(tmp_path / "plain"), abs=1e-5)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "gc")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_export_false_keeps_checkpoints_and_writes_no_final(demo_data, tmp_path):
    out = tmp_path / "noexport"
    args = train_overrides(demo_data, out, **{"train.max_steps": 1, "train.save_every": 1, "train.export": False})
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step_1" / "COMPLETE").exists() and not (out / "final").exists()
    assert (out / "metrics.jsonl").is_file()

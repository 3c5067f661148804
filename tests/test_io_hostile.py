"""Hostile and broken model directories: no code runs from them, no path leaves them, every error names the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mmembed
from mmembed.io import CONFIG_NAME, WEIGHTS_NAME, ModelDirError

PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("pwned")
from transformers import Qwen2Config
class EvilConfig(Qwen2Config):
    model_type = "qwen2"
"""


def _edit(out, fn):
    meta = json.loads((out / CONFIG_NAME).read_text())
    fn(meta)
    (out / CONFIG_NAME).write_text(json.dumps(meta))


def _plant_remote_code(out, marker):
    """The directory's HF config maps AutoConfig to a local .py that writes ``marker`` when imported."""
    (out / "backbone" / "evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    hf = json.loads((out / "backbone" / "config.json").read_text())
    hf["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilConfig"}
    (out / "backbone" / "config.json").write_text(json.dumps(hf))


def test_a_directory_asking_for_remote_code_is_refused_and_runs_nothing(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "m")
    marker = tmp_path / "marker"
    _plant_remote_code(out, marker)
    _edit(out, lambda m: m["model"]["backbone"].update(trust_remote_code=True))
    with pytest.raises(ModelDirError, match=r"trust_remote_code is true.*trust_remote_code=True"):
        mmembed.load(out)
    assert not marker.exists()
    for cmd in (
        ["encode", str(out), "--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "e.npy")],
        ["eval", str(out), "--data", str(tmp_path), "--out", str(tmp_path / "ev")],
    ):
        (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n')
        proc = subprocess.run([sys.executable, "-m", "mmembed.cli", *cmd], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "--trust-remote-code" in proc.stderr and "Traceback" not in proc.stderr
        assert not marker.exists()


def test_an_auto_map_without_the_callers_opt_in_never_executes(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "m")
    marker = tmp_path / "marker"
    _plant_remote_code(out, marker)
    loaded = mmembed.load(out)  # the built-in qwen2 classes are used, the .py is never imported
    assert not marker.exists()
    np.testing.assert_array_equal(loaded.encode(texts=["a cat"]), tiny_model.encode(texts=["a cat"]))


@pytest.mark.parametrize("value", ["../outside", "/etc", "link", "hub-org/some-model"])
def test_paths_stay_inside_the_directory(tiny_model, tmp_path, value):
    out = tiny_model.save(tmp_path / "m")
    (tmp_path / "outside").mkdir()
    (out / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    _edit(out, lambda m: m["model"]["backbone"].update(tokenizer=value))
    with pytest.raises(ModelDirError, match="model.backbone.tokenizer"):
        mmembed.load(out)


def test_a_symlink_inside_the_tokenizer_folder_is_refused(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "m")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    os.symlink(secret, out / "tokenizer" / "extra.json")
    with pytest.raises(ModelDirError, match="points outside the model directory"):
        mmembed.load(out)


@pytest.mark.parametrize(
    ("key", "value"),
    [("pretrained", True), ("checkpoint_path", "/tmp/w.safetensors")],
)
def test_downloads_and_foreign_weights_are_refused(tiny_model, tmp_path, key, value):
    out = tiny_model.save(tmp_path / "m")
    _edit(out, lambda m: m["model"]["vision"].update({key: value}))
    with pytest.raises(ModelDirError, match=f"model.vision.{key}"):
        mmembed.load(out)


def test_loading_forces_the_hub_offline_and_restores_it(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    out = tiny_model.save(tmp_path / "m")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    seen = []
    import mmembed.build as build

    real = build.build_from_cfg
    monkeypatch.setattr(build, "build_from_cfg", lambda cfg: seen.append(hc.HF_HUB_OFFLINE) or real(cfg))
    mmembed.load(out)
    assert seen == [True] and hc.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("version", [True, 0, -1, "1", 1.0, None])
def test_format_version_must_be_a_known_integer(tiny_model, tmp_path, version):
    out = tiny_model.save(tmp_path / "m")
    _edit(out, lambda m: m.update(format_version=version))
    with pytest.raises(ModelDirError, match=f"{CONFIG_NAME}: format_version"):
        mmembed.load(out)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff", ""])
def test_a_broken_config_names_the_file(tiny_model, tmp_path, text):
    out = tiny_model.save(tmp_path / "m")
    (out / CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ModelDirError, match=CONFIG_NAME):
        mmembed.load(out)


def test_weights_file_must_be_present(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "m")
    (out / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelDirError, match=WEIGHTS_NAME):
        mmembed.load(out)


def test_two_identical_models_save_identical_bytes(tmp_path):
    import torch

    from tests.conftest import TINY_RECIPE

    blobs = []
    for i in range(2):
        torch.manual_seed(0)
        out = mmembed.build_model(TINY_RECIPE).save(tmp_path / f"m{i}")
        blobs.append((out / WEIGHTS_NAME).read_bytes())
    assert blobs[0] == blobs[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts": ["a"], "batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"texts": ["a", 5]}, "row 1: text must be a string or None, got int"),
        ({"texts": ["a\udcffb"]}, "row 0: text is not valid Unicode"),
        ({"texts": ["a"], "instruction": ["\ud800"]}, "row 0: instruction is not valid Unicode"),
    ],
)
def test_bad_encode_arguments_give_clear_errors(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(**kwargs)

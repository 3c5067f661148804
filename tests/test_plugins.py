"""A user's own component without editing mmembed: a recipe's ``imports:`` or a ``mmembed.components`` entry point.

Everything runs in fresh interpreters, so the test process's registry never sees the plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import ROOT, TINY_RECIPE

PLUGIN = """
from mmembed.connectors.mlp import MLPConnector
from mmembed.registry import CONNECTORS


@CONNECTORS.register("{name}")
class {cls}(MLPConnector):
    example_args = [{{}}]
"""

BUILD_AND_SAVE = """
import sys, numpy as np, torch, mmembed
torch.manual_seed(0)
model = mmembed.build_model(sys.argv[1], sys.argv[3:])
model.save(sys.argv[2])
np.save(sys.argv[2] + ".npy", model.encode(texts=["a red circle"]))
print(sorted(mmembed.list_components()["connector"]))
"""

LOAD = """
import sys, numpy as np, mmembed
np.save(sys.argv[2], mmembed.load(sys.argv[1]).encode(texts=["a red circle"]))
"""


def _run(code: str, *args: str, path: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([str(path)] if path else [])])
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_recipe_imports_its_own_connector_and_the_saved_model_needs_it(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_connectors.py").write_text(PLUGIN.format(name="my_mlp", cls="MyMLP"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {TINY_RECIPE}\nimports: [my_connectors]\nmodel:\n  connector: {{type: my_mlp}}\n")
    out = tmp_path / "model"
    built = _run(BUILD_AND_SAVE, str(recipe), str(out), path=plugins)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "my_mlp" in built.stdout
    meta = json.loads((out / "mmembed_config.json").read_text())
    assert meta["model"]["connector"]["type"] == "my_mlp"
    assert meta["imports"] == [{"module": "my_connectors", "package": None}]
    loaded = _run(LOAD, str(out), str(tmp_path / "again.npy"), path=plugins)  # imported from the saved config
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), np.load(str(out) + ".npy"))
    missing = _run(LOAD, str(out), str(tmp_path / "x.npy"))  # the plugin is not on the path
    assert missing.returncode != 0 and "uses components from 'my_connectors'" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {TINY_RECIPE}\nimports: [no_such_module_here]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and "imports[0]: cannot import 'no_such_module_here'" in proc.stderr


def test_mmembed_train_takes_a_recipe_with_imports(tmp_path, demo_data):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_connectors.py").write_text(PLUGIN.format(name="my_mlp", cls="MyMLP"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {TINY_RECIPE}\nimports: [my_connectors]\nmodel:\n  connector: {{type: my_mlp}}\n")
    out = tmp_path / "run"
    train = "import sys; from mmembed.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"  # the CLI, in-path
    args = [str(recipe), f"data.train={demo_data / 'train.yaml'}", f"train.output_dir={out}", "train.max_steps=2"]
    args += ["train.batch_size=4", "model.max_length=48"]
    proc = _run(train, *args, path=plugins)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "final" / "mmembed_config.json").read_text())["model"]["connector"]["type"] == "my_mlp"


def test_an_entry_point_plugin_is_found_without_any_import(tmp_path):
    site = tmp_path / "site"
    (site / "plug_ep-0.1.dist-info").mkdir(parents=True)
    (site / "plug_ep.py").write_text(PLUGIN.format(name="ep_mlp", cls="EpMLP"))
    (site / "plug_ep-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-ep\nVersion: 0.1\n")
    (site / "plug_ep-0.1.dist-info" / "top_level.txt").write_text("plug_ep\n")
    (site / "plug_ep-0.1.dist-info" / "RECORD").write_text("plug_ep.py,,\n")
    (site / "plug_ep-0.1.dist-info" / "entry_points.txt").write_text("[mmembed.components]\nep = plug_ep\n")
    out = tmp_path / "model"
    built = _run(BUILD_AND_SAVE, str(TINY_RECIPE), str(out), "model.connector={type: ep_mlp}", path=site)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "ep_mlp" in built.stdout
    meta = json.loads((out / "mmembed_config.json").read_text())
    assert meta["imports"] == [{"module": "plug_ep", "package": "plug-ep"}]
    loaded = _run(LOAD, str(out), str(tmp_path / "again.npy"), path=site)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), np.load(str(out) + ".npy"))
    missing = _run(LOAD, str(out), str(tmp_path / "x.npy"))
    assert missing.returncode != 0 and "(plug-ep)" in missing.stderr

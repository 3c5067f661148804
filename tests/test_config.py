from __future__ import annotations

import subprocess
import sys

import pytest

from mmembed.config import ConfigError, load_recipe
from tests.conftest import ROOT, TINY_RECIPE


def test_tiny_recipe_loads_with_defaults():
    cfg = load_recipe(TINY_RECIPE)
    assert cfg.model.connector == {"type": "mlp", "depth": 2}
    assert cfg.train.optimizer == "adamw" and cfg.source == str(TINY_RECIPE)


def test_overrides_apply_with_yaml_typing():
    cfg = load_recipe(TINY_RECIPE, ["model.connector.depth=3", "train.lr=1e-5", "model.padding_side=right"])
    assert cfg.model.connector["depth"] == 3
    assert cfg.train.lr == pytest.approx(1e-5)
    assert cfg.model.padding_side == "right"


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        (["model.conector.type=mlp"], "model.conector", "Did you mean 'connector'"),
        (["model.connector.type=mpl"], "model.connector.type", "Did you mean 'mlp'"),
        (["model.connector.dept=3"], "model.connector", "did you mean 'depth'"),
        (["model.pooler.type=lst_token"], "model.pooler.type", "last_token"),
        (["train.optimizer=adamx"], "train.optimizer", "Allowed: adamw, sgd"),
        (["train.batch_size=two"], "train.batch_size", "expected an integer"),
        (["model.padding_side=middle"], "model.padding_side", "'left' or 'right'"),
        (["model.vision.nam=x"], "model.vision", "did you mean 'name'"),
        (["train.gradcache_chunk_size=64", "train.batch_size=8"], "train.gradcache_chunk_size", "between 1 and"),
        (["model.connector.depth=0"], "model.connector.depth", "must be >= 1"),
    ],
)
def test_bad_recipes_name_the_key_and_file(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY_RECIPE, override)
    err = info.value
    assert err.key == key, str(err)
    assert fragment in str(err)
    assert str(TINY_RECIPE) in str(err)


def test_missing_recipe_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(TINY_RECIPE, ["train.lr"])


def test_cli_reports_config_errors_with_exit_2_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "validate", str(TINY_RECIPE), "model.connector.type=mpl"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model.connector.type" in proc.stderr and "Did you mean 'mlp'" in proc.stderr
    assert str(TINY_RECIPE) in proc.stderr


def test_every_recipe_validates():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        load_recipe(path)


IMPOSSIBLE = {
    "train.lr=-1": "train.lr",
    "loss={type: infonce, temperature: 0}": "loss.temperature",
    "loss={type: infonce, temperature: -0.1}": "loss.temperature",
    "train.weight_decay=-1": "train.weight_decay",
    "train.grad_clip=-1": "train.grad_clip",
    "train.warmup_steps=-10": "train.warmup_steps",
    "train.save_every=-3": "train.save_every",
    "train.eval_every=-1": "train.eval_every",
    "train.log_every=0": "train.log_every",
    "train.max_bad_steps=0": "train.max_bad_steps",
    "model.max_pixels=-5": "model.max_pixels",
    "data.max_pixels=-5": "data.max_pixels",
    "data.shuffle_buffer=-1": "data.shuffle_buffer",
    "model.vision.image_size=0": "model.vision.image_size",
    "model.vision.image_size=-1": "model.vision.image_size",
    "model.max_images_per_input=0": "model.max_images_per_input",
    "train.eval_metric=acuracy": "train.eval_metric",
    "data.train=/nonexistent/train.yaml": "data.train",
    "train.resume=/nonexistent/step_5": "train.resume",
    "data.image_root=/nonexistent/images": "data.image_root",
    "train.deepspeed=/nonexistent/ds.json": "train.deepspeed",
}


@pytest.mark.parametrize("override", list(IMPOSSIBLE))
def test_validate_rejects_impossible_values_naming_the_key(override, capsys):
    from mmembed.cli import main

    recipe = ROOT / "recipes" / "tiny" / "composed.yaml"
    assert main(["validate", str(recipe), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmembed: config error: {IMPOSSIBLE[override]}:"), err


def test_validate_accepts_the_boundaries(capsys):
    from mmembed.cli import main

    recipe = ROOT / "recipes" / "tiny" / "composed.yaml"
    ok = [
        "train.lr=0",
        "train.grad_clip=0",
        "data.shuffle_buffer=0",
        "train.eval_metric=RET",
        "train.eval_metric=x/mrr",
    ]
    for override in ok:
        assert main(["validate", str(recipe), override]) == 0, capsys.readouterr().err


def test_a_format_1_reducer_in_a_recipe_becomes_merge_and_prune():
    cfg = load_recipe(TINY_RECIPE, ["model.reducer={type: aim, keep_ratio: 0.5, schedule: [0.5], step: 0.25}"])
    assert cfg.model.merge == {"type": "aim", "keep_ratio": 0.5}
    assert cfg.model.prune == {"type": "aim", "mode": "fast", "schedule": [0.5], "step": 0.25}
    assert load_recipe(TINY_RECIPE, ["model.reducer={type: merge, keep_ratio: 0.5}"]).model.prune is None
    with pytest.raises(ConfigError, match="model.reducer"):
        load_recipe(TINY_RECIPE, ["model.reducer={type: tome}"])

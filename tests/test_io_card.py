"""The generated model card (README.md): Hugging Face front matter, a usage snippet that runs against the saved
directory with a saved prompt name, the recipe, training data and eval scores when the caller knows them."""

from __future__ import annotations

import re

import yaml

from mmembed.io import save_model
from tests.conftest import make_image


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)


def test_card_front_matter_and_a_snippet_that_runs(tiny_model, tmp_path):
    out = save_model(tiny_model, tmp_path / "m")
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "mmembed" and front["pipeline_tag"] == "feature-extraction"
    assert "mmembed" in front["tags"] and "multimodal" in front["tags"]
    assert front["license"] == "other" and "Not recorded" in card  # unknown licence: said so, not guessed
    code = _snippet(card)
    used = re.search(r'instruction="([^"]+)"', code).group(1)
    assert used in tiny_model.cfg.prompts  # a saved prompt name
    for slot, name in (("vision", "timm"), ("connector", "mlp"), ("backbone", "hf_causal_lm")):
        assert f"| {slot} | {name} |" in card
    assert "model_type=qwen2" in card and "image_size=64" in card  # key arguments
    make_image(0).save(tmp_path / "photo.jpg")
    scope: dict = {}
    exec(code.replace("path/to/this/dir", str(out)).replace("photo.jpg", str(tmp_path / "photo.jpg")), scope)
    assert scope["emb"].shape == (2, tiny_model.embed_dim)


def test_card_shows_recipe_data_scores_and_licence_when_given(tiny_model, tmp_path):
    scores = {
        "datasets": {
            "MSCOCO_t2i": {"hit@1": 0.625, "official": 0.75, "meta_task": "RET"},
            "N24News": {"hit@1": 0.3125, "meta_task": "CLS"},
        },
        "meta_tasks": {"RET": {"hit@1": 0.625}, "CLS": {"hit@1": 0.3125}},
        "overall": 0.46875,
        "official_overall": 0.53125,
    }
    info = {
        "recipe": {"source": "recipes/tiny/demo.yaml", "train.lr": 1e-4, "train.max_steps": 40},
        "data": {"demo_t2i": 60, "demo_vqa": 30},
        "scores": scores,
        "license": "apache-2.0",
    }
    card = (save_model(tiny_model, tmp_path / "m", card_info=info) / "README.md").read_text()
    assert _front_matter(card)["license"] == "apache-2.0" and "Not recorded" not in card
    assert "## Evaluation" in card and "| MSCOCO_t2i | RET | 0.6250 | 0.7500 |" in card and "0.4688" in card
    assert "official (MMEB)" in card and "| N24News | CLS | 0.3125 | - |" in card and "0.5312" in card
    assert "## Training data" in card and "demo_t2i: 60" in card
    assert "recipes/tiny/demo.yaml" in card and "train.max_steps" in card
    flat = save_model(tiny_model, tmp_path / "f", card_info={"scores": {"overall": 0.5}})
    assert "| overall | 0.5000 |" in (flat / "README.md").read_text()
    plain = (save_model(tiny_model, tmp_path / "p") / "README.md").read_text()
    assert "## Evaluation" not in plain and "## Training data" not in plain

"""The composed model end to end: batch-size and padding-side invariance, splicing, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmembed
from mmembed.processing import InputError
from mmembed.types import Side
from tests.conftest import TINY_RECIPE, make_image

# Decoder families whose tiny configs the tests build (AutoModel.from_config, no download).
FAMILIES = ["qwen2", "llama", "mistral", "phi3", "qwen3", "gemma"]


def _rows():
    imgs = [make_image(i, size=(32 + 8 * i, 60 - 3 * i)) for i in range(7)]
    texts = [
        "a red circle on the left",
        None,
        "what color is the object in the image? answer with one word",
        "x",
        None,
        "a blue square at the top of a very long caption that goes on and on",
        "",
    ]
    images = [None, imgs[1], imgs[2], None, [imgs[4], imgs[5]], imgs[5], imgs[6]]
    instructions = [
        None,
        "Represent the given image.",
        "Represent the given image with the following question:",
        "Find me an everyday image that matches the given caption:",
        None,
        None,
        "Represent the given image.",
    ]
    return texts, images, instructions


def _build(family: str, padding_side: str):
    torch.manual_seed(0)
    overrides = [f"model.backbone.config.model_type={family}", f"model.padding_side={padding_side}"]
    if family == "gemma":
        overrides += ["model.backbone.config.head_dim=16"]
    if family == "phi3":  # its default pad id (32000) lies outside the tiny vocabulary
        overrides += ["model.backbone.config.pad_token_id=0"]
    return mmembed.build_model(TINY_RECIPE, overrides).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_embedding_whatever_batch_size_and_padding_side(family):
    texts, images, instr = _rows()
    left = _build(family, "left")
    right = _build(family, "right")
    right.load_state_dict(left.state_dict())
    e_left_7 = left.encode(texts=texts, images=images, instruction=instr, batch_size=7)
    e_left_1 = left.encode(texts=texts, images=images, instruction=instr, batch_size=1)
    e_right_7 = right.encode(texts=texts, images=images, instruction=instr, batch_size=7)
    e_right_3 = right.encode(texts=texts, images=images, instruction=instr, batch_size=3)
    assert e_left_7.shape == (7, 64) and e_left_7.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e_left_7, axis=1), 1.0, atol=1e-5)
    for other in (e_left_1, e_right_7, e_right_3):
        assert np.abs(e_left_7 - other).max() <= 1e-5
    # the rows really differ (a model that ignores its input would pass the checks above)
    assert np.abs(e_left_7[0] - e_left_7[3]).max() > 1e-3


def test_image_and_instruction_change_the_embedding(tiny_model):
    img_a, img_b = make_image(1), make_image(2)
    e = tiny_model.encode(
        texts=["a cat", "a cat", "a cat", "a cat"],
        images=[img_a, img_b, img_a, None],
        instruction=["Represent the image.", "Represent the image.", "Classify the image.", "Represent the image."],
    )
    for i, j in [(0, 1), (0, 2), (0, 3)]:
        assert np.abs(e[i] - e[j]).max() > 1e-4, (i, j)


def test_placeholder_in_text_places_the_image(tiny_model):
    img = make_image(3)
    a = tiny_model.encode(texts=["<image>a cat"], images=[img])
    b = tiny_model.encode(texts=["a cat"], images=[img])  # no placeholder: image goes first
    c = tiny_model.encode(texts=["a cat <image>"], images=[img])
    assert np.abs(a - b).max() <= 1e-6
    assert np.abs(a - c).max() > 1e-4


def test_empty_input_and_similarity(tiny_model):
    e = tiny_model.encode(texts=[], images=[])
    assert e.shape == (0, 64)
    x = tiny_model.encode(texts=["a", "b"])
    s = tiny_model.similarity(x, x)
    assert s.shape == (2, 2) and np.allclose(np.diag(s), 1.0, atol=1e-5)
    t = tiny_model.encode(texts=["a", "b"], convert_to="torch")
    assert isinstance(t, torch.Tensor) and torch.allclose(tiny_model.similarity(t, t), torch.from_numpy(s), atol=1e-6)


def test_bad_rows_are_named(tiny_model, tmp_path):
    with pytest.raises(InputError, match=r"row 1: image .*missing\.png: file not found"):
        tiny_model.encode(texts=["a", "b"], images=[None, str(tmp_path / "missing.png")])
    with pytest.raises(InputError, match="row 0: the text has 2 image placeholder"):
        tiny_model.encode(texts=["<image> and <image>"], images=[make_image(0)])
    with pytest.raises(InputError, match="row 2: empty input"):
        tiny_model.encode(texts=["a", "b", None], images=[None, None, None])
    with pytest.raises(ValueError, match="aligned"):
        tiny_model.encode(texts=["a", "b"], images=[None])


def test_long_text_is_truncated_once_with_a_warning_and_keeps_the_image(tiny_model, caplog):
    long = "word " * 400
    with caplog.at_level("WARNING"):
        batch = tiny_model.processor([Side(text=long, images=[make_image(0)]), Side(text=long)])
    assert batch["input_ids"].shape[1] <= tiny_model.cfg.max_length + tiny_model.processor.image_tokens
    n_img = (batch["input_ids"][0] == tiny_model.processor.placeholder_id).sum()
    assert n_img == tiny_model.processor.image_tokens
    assert sum("truncating" in r.message for r in caplog.records) == 1


def test_processor_masks_and_expansion(tiny_model):
    p = tiny_model.processor
    side = Side(instruction="Represent the given image.", text="a red circle", images=[make_image(0)])
    batch = p([side, Side(text="hi")])
    ids, am, pm = batch["input_ids"], batch["attention_mask"], batch["pool_mask"]
    assert ids.shape[1] == am[0].sum()  # the longest row sets the length (pad to longest, not a fixed length)
    assert (ids[0] == p.placeholder_id).sum() == p.image_tokens == 16
    n_instr = len(p.tokenizer("Represent the given image.", add_special_tokens=False)["input_ids"])
    assert int(am[0].sum() - pm[0].sum()) == n_instr
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    assert ids[1, 0] == p.pad_id and am[1, 0] == 0  # left padding
    assert ids[0, -1] == p.tokenizer.eos_token_id


def test_split_batch_chunks_give_the_same_embeddings(tiny_model):
    from mmembed.data.sample import Side

    texts, images, instr = _rows()
    sides = tiny_model._rows(texts, images, instr)
    batch = tiny_model.processor(sides)
    with torch.no_grad():
        full = tiny_model(batch)
        parts = torch.cat([tiny_model(c) for c in tiny_model.processor.split(batch, 3)])
    assert isinstance(sides[0], Side)
    assert torch.allclose(full, parts, atol=1e-5)
    chunks = tiny_model.processor.split(batch, 3)
    assert [c["input_ids"].shape[0] for c in chunks] == [3, 3, 1]
    assert sum(c.get("pixel_values", torch.empty(0, 3, 64, 64)).shape[0] for c in chunks) == 6
    assert chunks[-1]["input_ids"].shape[1] == int(batch["attention_mask"][-1].sum())  # trimmed to its own length


def test_inline_and_separate_instructions_tokenize_alike(tiny_model):
    """MMEB-train puts the instruction inline (``<|image_1|> Represent ...``), MMEB-eval in its own field."""
    from mmembed.data.sample import Side

    p = tiny_model.processor
    img = make_image(0)
    inline = Side(text="<image> Represent the given image with the following question: what color?", images=[img])
    separate = Side(
        instruction="Represent the given image with the following question:", text="<image>what color?", images=[img]
    )
    no_placeholder = Side(
        instruction="Represent the given image with the following question:", text="what color?", images=[img]
    )
    a, b, c = p([inline]), p([separate]), p([no_placeholder])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_ids"], c["input_ids"])
    assert a["pool_mask"].sum() > b["pool_mask"].sum()  # only the separate field marks instruction tokens
    ids = b["input_ids"][0]
    assert (ids[: p.image_tokens] == p.placeholder_id).all()  # VLM2Vec layout: image, instruction, text

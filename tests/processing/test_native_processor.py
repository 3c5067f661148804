"""NativeProcessor mirrors the composed Processor: instruction tokens (and a tokenizer BOS) are left out of
``pool_mask``, leading images are pooled, and over-long texts are cut to ``max_length`` text tokens before the HF
processor expands the images, so image runs stay whole. Tiny Qwen2-VL and LLaVA recipes, offline, seconds."""

from __future__ import annotations

import logging

import pytest
import torch

import mmembed
from mmembed.backbones.splice import image_runs
from mmembed.data.sample import Side
from mmembed.processing import NativeProcessor
from tests.conftest import make_image
from tests.native_vlms import ROOT

RECIPES = {"qwen2_vl": "recipes/tiny/qwen2vl.yaml", "llava": "recipes/tiny/llava.yaml"}
INSTR = "Represent the given image."
LONG = "a red circle on the left. a blue square at the top. " * 8


@pytest.fixture(scope="module")
def models():
    """family -> tiny native EmbeddingModel (built once per module)."""
    return {family: mmembed.build_model(ROOT / recipe).eval() for family, recipe in RECIPES.items()}


@pytest.fixture(params=[(f, s) for f in RECIPES for s in ("left", "right")], ids=lambda p: f"{p[0]}-{p[1]}")
def proc(request, models, monkeypatch) -> NativeProcessor:
    family, side = request.param
    p = models[family].processor
    monkeypatch.setattr(p, "padding_side", side)
    monkeypatch.setattr(p, "_warned_truncation", False)
    return p


def _ids(p: NativeProcessor, text: str) -> list[int]:
    return list(p.tokenizer(text, add_special_tokens=False)["input_ids"])


def _unpooled(batch: dict[str, torch.Tensor], i: int) -> list[int]:
    """Real tokens of row ``i`` that ``pool_mask`` leaves out, in order."""
    ids, am, pm = batch["input_ids"][i], batch["attention_mask"][i], batch["pool_mask"][i]
    return ids[(am == 1) & (pm == 0)].tolist()


def _text_tokens(p: NativeProcessor, batch: dict[str, torch.Tensor], i: int) -> int:
    """Real tokens of row ``i`` that are neither image tokens nor the image text's markup (Qwen's vision_start/end)."""
    markup = torch.tensor(sorted(set(_ids(p, p.image_text))))
    ids = batch["input_ids"][i][batch["attention_mask"][i] == 1]
    return int((~torch.isin(ids, markup)).sum())


def _run_lengths(p: NativeProcessor, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(row, length) of each contiguous image-token run, in batch order."""
    return [(b, stop - start) for b, start, stop in image_runs(batch["input_ids"], p.placeholder_id)]


def test_pool_mask_leaves_out_exactly_the_instruction(proc):
    imgs = [make_image(i, size=s) for i, s in enumerate([(40, 48), (100, 70), (64, 64), (56, 56)])]
    sides = [
        Side(instruction=INSTR, text="what color?", images=[imgs[0]]),  # leading image, instruction, text
        Side(instruction="Find an image caption:", text="a red circle"),  # text only
        Side(text="a blue square", images=[imgs[1]]),  # no instruction: every real token pooled
        Side(text="blue"),  # no instruction, text only, short (padding)
        Side(instruction=INSTR, text=None, images=[imgs[2], imgs[3]]),  # two leading images (one LLaVA run)
        Side(instruction=INSTR, text="two <image> and <image> compare", images=[imgs[0], imgs[3]]),  # interleaved
    ]
    instructions = [INSTR, "Find an image caption:", None, None, INSTR, INSTR]
    batch = proc(sides)
    assert batch["pool_mask"].shape == batch["attention_mask"].shape
    assert (batch["pool_mask"] <= batch["attention_mask"]).all()
    for i, instr in enumerate(instructions):
        assert _unpooled(batch, i) == (_ids(proc, instr) if instr else []), f"row {i}"
    images = batch["input_ids"] == proc.placeholder_id
    assert images.any() and (batch["pool_mask"][images] == 1).all()  # image tokens, leading ones included, pooled


def test_inline_and_separate_instructions_tokenize_alike(proc):
    """As for the composed processor: same ids; only the instruction field marks tokens to leave out."""
    img = make_image(0)
    inline = Side(text=f"<image> {INSTR} what color?", images=[img])
    separate = Side(instruction=INSTR, text="<image>what color?", images=[img])
    no_placeholder = Side(instruction=INSTR, text="what color?", images=[img])
    a, b, c = proc([inline]), proc([separate]), proc([no_placeholder])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_ids"], c["input_ids"])
    assert torch.equal(b["pool_mask"], c["pool_mask"])
    assert torch.equal(a["pool_mask"], a["attention_mask"])
    assert _unpooled(b, 0) == _ids(proc, INSTR)


def test_bos_added_by_the_tokenizer_is_not_pooled():
    """A Llama-style tokenizer prepends BOS; the HF processor keeps it (it tokenizes with special tokens)."""
    from tokenizers.processors import TemplateProcessing

    from mmembed.backbones.llava import build_tiny_llava_processor

    hf = build_tiny_llava_processor()
    bos = hf.tokenizer.bos_token_id
    hf.tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    p = NativeProcessor(hf, image_text="<image>", image_token_id=400, padding_side="left", max_length=12)
    assert p.n_prefix == 1
    sides = [Side(instruction=INSTR, text="what?", images=[make_image(0)]), Side(text="blue"), Side(text=LONG)]
    batch = p(sides)
    for i, instr in enumerate([INSTR, None, None]):
        first = int(batch["attention_mask"][i].argmax())
        assert int(batch["input_ids"][i, first]) == bos
        assert _unpooled(batch, i) == [bos] + (_ids(p, instr) if instr else [])
    assert _text_tokens(p, batch, 2) == 12  # the budget counts BOS and EOS


def test_long_text_is_cut_to_max_length_and_keeps_image_runs(proc, models, monkeypatch, caplog):
    imgs = [make_image(0, size=(100, 70)), make_image(1, size=(56, 56))]
    sides = [
        Side(instruction=INSTR, text=LONG, images=[imgs[0]]),
        Side(text="a blue square", images=[imgs[1]]),  # under the budget
        Side(instruction=INSTR, text=f"<image> {LONG} <image> {LONG}", images=imgs),  # second chunk cut away
        Side(text=LONG),
    ]
    full = proc(sides)
    full_texts = [proc.text(s, r) for r, s in enumerate(sides)]
    monkeypatch.setattr(proc, "max_length", 16)
    with caplog.at_level(logging.WARNING):
        texts, _, _ = proc.texts(sides, range(len(sides)))
        batch = proc(sides)
    assert sum("truncating" in r.message for r in caplog.records) == 1  # once per processor
    assert texts[1] == full_texts[1] and texts[0] != full_texts[0]  # rows under the budget: byte-identical
    real = [b["input_ids"][1][b["attention_mask"][1] == 1] for b in (batch, full)]
    assert torch.equal(*real)
    n_suffix = len(_ids(proc, proc.suffix))
    for i in (0, 2, 3):
        assert _text_tokens(proc, batch, i) == 16, f"row {i}"
        row = batch["input_ids"][i][batch["attention_mask"][i] == 1]
        assert row[-n_suffix:].tolist() == _ids(proc, proc.suffix)  # EOS kept for last-token pooling
    assert _run_lengths(proc, batch) == _run_lengths(proc, full)  # image runs: the HF expansion, whole
    assert sum(b == 2 for b, _ in _run_lengths(proc, batch)) == 2  # both images of the cut two-image row
    assert _unpooled(batch, 0) == _ids(proc, INSTR) and _unpooled(batch, 2) == _ids(proc, INSTR)
    model = next(m for m in models.values() if m.processor is proc)
    with torch.no_grad():
        emb = model(batch)
    assert emb.shape[0] == len(sides) and torch.isfinite(emb).all()


def test_mean_pooling_of_a_native_model_ignores_the_instruction():
    """Without EOS, ``<image> instruction`` pools only the image block, which (causal) never sees the instruction."""
    model = mmembed.build_model(
        ROOT / RECIPES["qwen2_vl"], ["model.pooler.type=mean", "model.backbone.add_eos=false"]
    ).eval()
    img = make_image(3, size=(64, 64))
    a = model.processor([Side(instruction=INSTR, images=[img])])
    b = model.processor([Side(instruction="Find an image caption describing the given everyday image.", images=[img])])
    with torch.no_grad():
        assert torch.allclose(model(a), model(b), atol=1e-6)
        model.pooler.skip_instruction = False  # averaging over the attention mask does see it
        assert not torch.allclose(model(a), model(b), atol=1e-4)

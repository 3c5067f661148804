"""The native ``qwen3_vl`` backbone: mmembed's embedding is the transformers model's own last-token state.

A tiny random-init Qwen3-VL checkpoint (DeepStack on ViT layers 0 and 1, interleaved M-RoPE; tests/native_vlms.py)
loaded by ``backbone.name=<dir>``. References are transformers' own forward: ``Qwen3VLModel(**hf_inputs)`` on the
HF processor's output (stock path, and the spliced path with nothing reduced), the same forward with mmembed's
connector in the merger's slot (connector swap), ``get_rope_index`` (positions), and the forward on precomputed
``mm_encoder_outputs`` (merging: the DeepStack rows land where transformers puts them). Also GradCache against the
plain step, LoRA/DoRA targets, and save/load.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmembed
from mmembed.backbones.native import VLM2VEC_LORA_TARGETS
from mmembed.backbones.qwen3_vl import merge_deepstack
from mmembed.config import ConfigError
from mmembed.data.sample import Side
from mmembed.train.setup import apply_lora, merge_lora
from tests.conftest import make_image
from tests.native_vlms import SIZES, expected_texts, gradcache_and_plain, mixed_rows

IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    return hf_checkpoint("qwen3_vl")


def _rows():
    sides, imgs = mixed_rows()
    return sides, expected_texts(IMAGE_TEXT), imgs


def _build(path, side="left", normalize=False, **slots):
    model = {"backbone": {"type": "qwen3_vl", "name": str(path)}, "pooler": {"type": "last_token"}}
    model.update(normalize=normalize, padding_side=side, **slots)
    torch.manual_seed(0)
    return mmembed.build_model({"model": model}).eval()


def _last(hidden, mask):
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # last real column, either padding side
    return hidden[torch.arange(hidden.shape[0]), last]


def _reference(hf, proc, texts, imgs, side):
    inputs = proc(text=texts, images=imgs, padding=True, padding_side=side, return_tensors="pt")
    with torch.no_grad():
        hidden = hf.model(**inputs).last_hidden_state  # (B, L, d): the HF model's own forward
    return inputs, _last(hidden, inputs["attention_mask"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_embedding_equals_the_hf_models_last_token_state(side, ckpt, tmp_path):
    path, hf, proc = ckpt
    sides, texts, imgs = _rows()
    inputs, ref = _reference(hf, proc, texts, imgs, side)
    model = _build(path, side)
    batch = model.processor(sides)
    assert torch.equal(batch["input_ids"], inputs["input_ids"]), "processor output differs from the HF processor's"
    assert torch.equal(batch["attention_mask"], inputs["attention_mask"].long())
    with torch.no_grad():
        emb = model(batch)
    assert float((emb - ref).abs().max()) <= 1e-5  # measured: 0.0
    assert float(torch.cdist(ref, ref).fill_diagonal_(1.0).min()) > 1e-3, "the rows must differ"

    # the spliced path (mmembed's splice, M-RoPE ids and DeepStack injection) with nothing reduced
    for slots in ({"merge": {"type": "aim", "keep_ratio": 1.0}}, {"prune": {"type": "aim", "schedule": [1.0]}}):
        spliced = _build(path, side, **slots)
        with torch.no_grad():
            assert spliced.visual(batch) is not None
            assert float((spliced(batch) - ref).abs().max()) <= 1e-5, slots  # measured: 0.0

    kw = {"texts": [s.text for s in sides], "images": [s.images or None for s in sides]}
    kw["instruction"] = [s.instruction for s in sides]
    model.cfg.normalize = True
    one, six = model.encode(**kw, batch_size=1), model.encode(**kw, batch_size=6)
    assert np.abs(one - six).max() <= 1e-5
    assert np.abs(six - F.normalize(ref, dim=-1).numpy()).max() <= 1e-5
    loaded = mmembed.load(model.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.encode(**kw, batch_size=6), six)


def test_deepstack_reaches_the_embedding_and_spliced_positions_equal_hf_rope_index(ckpt):
    path, hf, _ = ckpt
    model = _build(path, merge={"type": "aim", "keep_ratio": 1.0})
    batch = model.processor(_rows()[0])
    bb = model.backbone
    with torch.no_grad():
        items = model.visual(batch)
        sp = bb.splice(batch, items)
        ref, _ = bb.base_model().get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], None, batch["attention_mask"]
        )
        valid = batch["attention_mask"].bool()
        assert torch.equal(sp.position_ids[:, valid], ref[:, valid])
        assert all(it.deep.shape == (2, *it.tokens.shape) for it in items)
        emb = model(batch)
        for it in items:
            it.deep = torch.zeros_like(it.deep)
        without = bb(batch, items)[0]
    assert float((_last(without, batch["attention_mask"]) - emb).abs().max()) > 1e-3, "DeepStack must matter"


class _Reference(nn.Module):
    """Qwen's merger slot filled with the connector: (N_patches, D_v) -> 2x2 units (N/4, 4 D_v) -> connector."""

    def __init__(self, connector: nn.Module) -> None:
        super().__init__()
        self.connector = connector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.connector(x.reshape(1, -1, 4 * x.shape[-1]), (0, 0))[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_mlp_connector_in_place_of_the_merger_equals_the_hf_forward(side, ckpt):
    path, _, _ = ckpt
    model = _build(path, side, connector={"type": "mlp"})
    keys = model.state_dict().keys()
    assert any(k.startswith("connector.") for k in keys) and not any(".visual.merger." in k for k in keys)
    assert any("deepstack_merger_list" in k for k in keys), "the DeepStack mergers stay"
    assert model.connector.proj[0].in_features == 4 * 32
    batch = model.processor(_rows()[0])
    ref_model = copy.deepcopy(model.backbone.base_model())
    ref_model.visual.merger = _Reference(copy.deepcopy(model.connector))
    with torch.no_grad():
        ours = model(batch)
        kwargs = {k: batch[k] for k in model.backbone.model_keys if k in batch}
        ref = _last(ref_model(**kwargs, use_cache=False).last_hidden_state, batch["attention_mask"])
    assert float((ours - ref).abs().max()) <= 1e-5  # measured: 9.5e-7 (connector called per grid)


def test_merged_tokens_carry_merged_deepstack_rows_where_hf_puts_them(ckpt):
    path, _, _ = ckpt
    model = _build(path, merge={"type": "aim", "keep_ratio": 0.5})
    batch = model.processor(_rows()[0])
    bb = model.backbone
    with torch.no_grad():
        raw = bb.image_items(batch, None)
        items = model.visual(batch)
        for it, full in zip(items, raw):
            merged, idx = model.merge.reduce(full.tokens[None])
            assert torch.equal(it.tokens, merged[0]) and torch.equal(it.index, idx[0])  # the merger's own output
            # deep rows equal to the tokens merge exactly as the tokens do: same assignments, same means
            twin = merge_deepstack(type(full)(full.tokens, full.pos, full.span, deep=full.tokens[None]), model.merge)
            assert torch.equal(twin.deep[0], it.tokens)
            assert it.deep.shape == (2, *it.tokens.shape)
        sp = bb.splice(batch, items)
        assert sp.visual.sum() == sum(it.tokens.shape[0] for it in items) < (batch["input_ids"] == 400).sum()
        emb = model(batch)
        # transformers' forward on the spliced ids with the merged tokens and DeepStack rows precomputed
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        ids = torch.where(sp.source >= 0, batch["input_ids"].gather(1, sp.source.clamp_min(0)), 0)
        enc = BaseModelOutputWithDeepstackFeatures(
            pooler_output=[it.tokens for it in items],
            deepstack_features=[[it.deep[i] for it in items] for i in range(2)],
        )
        hidden = bb.base_model()(
            input_ids=ids,
            attention_mask=sp.attention_mask,
            position_ids=sp.position_ids,
            mm_encoder_outputs={"image": enc},
            use_cache=False,
        ).last_hidden_state
    assert float((_last(hidden, sp.attention_mask) - emb).abs().max()) <= 1e-5  # measured: 0.0


def test_pruning_exact_runs_deepstack_and_fast_before_deepstack_is_refused(ckpt):
    path, _, _ = ckpt
    plain = _build(path)
    batch = plain.processor(_rows()[0])
    prune = _build(path, prune={"type": "aim", "schedule": [0.5]})
    fast_late = _build(path, prune={"type": "aim", "schedule": [1.0], "mode": "fast"})
    with torch.no_grad():
        a, c, d = plain(batch), prune(batch), fast_late(batch)
        _, attn, _ = prune.backbone(batch, prune.visual(batch), pruner=prune.prune)
    assert torch.isfinite(c).all() and float((a - c).abs().max()) > 1e-4
    assert float((a - d).abs().max()) <= 1e-5
    n_img = (batch["input_ids"] == 400).sum(dim=1)
    assert torch.equal(batch["attention_mask"].sum(dim=1) - attn.sum(dim=1), n_img - torch.floor(n_img * 0.5).long())
    with pytest.raises(ConfigError, match="DeepStack") as e:
        _build(path, prune={"type": "aim", "schedule": [0.5], "mode": "fast"})
    assert e.value.key == "model.prune.mode"
    with pytest.raises(ConfigError, match="DeepStack") as e:
        _build(path, connector={"type": "pool_adapter", "pool_size": 2, "mode": "adaptive"})
    assert e.value.key == "model.connector"


def _pairs():
    imgs = [make_image(10 + i, size=s) for i, s in enumerate(SIZES)]
    queries = [
        Side(text="a red circle", images=[]),
        Side(instruction="Represent the given image.", images=[imgs[0]]),
        Side(text="two <image> and <image>", images=[imgs[1], imgs[2]]),
        Side(text="blue square", images=[]),
    ]
    targets = [Side(images=[imgs[3]]), Side(text="a caption"), Side(text="<image> x", images=[imgs[4]]), Side(text="y")]
    return queries, targets


@pytest.mark.parametrize(
    "slots",
    [{}, {"connector": {"type": "mlp"}, "merge": {"type": "aim", "keep_ratio": 0.5}, "prune": {"type": "aim"}}],
    ids=["stock", "connector+aim"],
)
def test_gradcache_equals_the_plain_step(slots, ckpt):
    path, _, _ = ckpt
    model = _build(path, normalize=True, **slots).train()
    queries, targets = _pairs()
    res, plain, grads, ref_grads = gradcache_and_plain(model, model.processor(queries), model.processor(targets))
    assert res.num_chunks == 4
    assert abs(float(res.loss) - plain.item()) <= 1e-5
    assert grads.keys() == ref_grads.keys() and any("deepstack_merger_list" in n for n in grads)
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3, "the step must have a gradient"
    # relative to each tensor's largest gradient (tests/train/test_gradcache.py): chunks are padded differently
    rel = max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)) for n in grads)
    assert rel <= 1e-5  # measured: stock 1.3e-6, connector+aim 7.9e-7 (abs 1.0e-5, 9.5e-6 of |g| <= 23)


def test_lora_dora_targets_the_llm_and_the_merged_model_reloads(ckpt, tmp_path):
    path, _, _ = ckpt
    model = _build(path, normalize=True)
    apply_lora(model, {"r": 2, "target_modules": VLM2VEC_LORA_TARGETS, "use_dora": True, "init": "gaussian"})
    names = [n for n, m in model.backbone.model.named_modules() if hasattr(m, "lora_A") and n]
    assert any("language_model" in n and n.endswith("q_proj") for n in names)
    assert not any(".visual." in n for n in names), "VLM2Vec's targets miss the Qwen3-VL ViT (qkv, linear_fc1)"
    sides = _rows()[0]
    batch = model.processor(sides)
    model.train()
    model(batch).sum().backward()
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora and any(g is not None and float(g.abs().max()) > 0 for g in lora)
    model.eval()
    merge_lora(model)
    kw = {"texts": [s.text for s in sides], "images": [s.images or None for s in sides]}
    emb = model.encode(**kw, instruction="Represent the given input.")
    again = mmembed.load(model.save(tmp_path / "m")).encode(**kw, instruction="Represent the given input.")
    np.testing.assert_array_equal(emb, again)


def test_text_only_training_batch_reaches_the_deepstack_mergers(ckpt):
    path, _, _ = ckpt
    model = _build(path).train()
    model(model.processor([Side(text="a red circle"), Side(text="blue square")])).sum().backward()
    tower = model.backbone.vision_tower()
    text = {n for n, p in tower.named_parameters() if p.grad is not None}
    assert any(n.startswith("deepstack_merger_list") for n in text)
    model.zero_grad(set_to_none=True)
    model(model.processor([Side(text="a red circle", images=[make_image(0)])])).sum().backward()
    assert text == {n for n, p in tower.named_parameters() if p.grad is not None}

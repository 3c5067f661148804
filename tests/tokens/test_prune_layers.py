"""Pruning runs each layer as the family's own forward does: sliding windows, per-layer types, Gemma 3's rotary.

Keep-all (schedule 1.0) must equal the plain forward, in both modes, for every decoder family the pruner accepts,
with a window (4) shorter than the sequences; the windows are checked to matter (a full-causal run differs).
"""

from __future__ import annotations

import pytest
import torch

from mmembed.tokens.layers import allowed_mask, layer_windows
from mmembed.tokens.prune import AIMPruner
from tests.tiny_models import build, rows

_C = "model.backbone.config."
FAMILIES = {
    "qwen2": [f"{_C}model_type=qwen2"],
    "llama": [f"{_C}model_type=llama"],
    "phi3": [f"{_C}model_type=phi3", f"{_C}pad_token_id=0"],
    "qwen3": [f"{_C}model_type=qwen3"],
    "gemma": [f"{_C}model_type=gemma", f"{_C}head_dim=16"],
    # sliding windows: layer 0 full, layer 1 sliding (Qwen: use_sliding_window and layers >= max_window_layers)
    "qwen2_window": [f"{_C}model_type=qwen2", f"{_C}use_sliding_window=true", f"{_C}sliding_window=4",
                     f"{_C}max_window_layers=1"],
    "qwen3_window": [f"{_C}model_type=qwen3", f"{_C}use_sliding_window=true", f"{_C}sliding_window=4",
                     f"{_C}max_window_layers=1"],
    "mistral_window": [f"{_C}model_type=mistral", f"{_C}sliding_window=4"],  # every layer
    "phi3_window": [f"{_C}model_type=phi3", f"{_C}pad_token_id=0", f"{_C}sliding_window=4"],
    "gemma2_window": [f"{_C}model_type=gemma2", f"{_C}head_dim=16", f"{_C}sliding_window=4",
                      "model.backbone.attn_implementation=eager"],  # layer 0 sliding, layer 1 full; softcapped
    "gemma3_window": [f"{_C}model_type=gemma3_text", f"{_C}head_dim=16", f"{_C}sliding_window=4",
                      f"{_C}layer_types=[sliding_attention, full_attention]"],  # local vs global rope too
    "qwen2_window_bidirectional": [f"{_C}model_type=qwen2", f"{_C}use_sliding_window=true", f"{_C}sliding_window=4",
                                   f"{_C}max_window_layers=0", "model.backbone.attention=bidirectional"],
}  # fmt: skip


def _decode(model, pruner=None):
    texts, images, instr = rows()
    batch = model.processor(model._rows(texts, images, instr))
    with torch.no_grad():
        sp = model.backbone.splice(batch, model.visual(batch))
        hidden, mask, _ = model.backbone.decode(sp, pruner)
    return hidden * mask[..., None], mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_all_equals_the_plain_forward_in_both_modes(family):
    model = build(*FAMILIES[family])
    plain, mask = _decode(model)
    for mode in ("exact", "fast"):
        hidden, kept = _decode(model, AIMPruner(num_layers=2, schedule=[1.0], mode=mode))
        assert torch.equal(kept, mask)
        assert float((hidden - plain).abs().max()) <= 1e-5, mode
    if "window" in family and "bidirectional" not in family:  # the window matters on these sequences
        lm = model.backbone.model
        lm.config.sliding_window = 10_000
        full, _ = _decode(model)
        assert float((full - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["gemma2_window", "gemma3_window"])
def test_gemma_pruning_runs_and_leaves_imageless_rows_alone(family):
    model = build(*FAMILIES[family])
    plain, _ = _decode(model)
    for mode in ("exact", "fast"):
        hidden, kept = _decode(model, AIMPruner(num_layers=2, schedule=[0.25], mode=mode))
        assert torch.isfinite(hidden).all() and int(kept.sum()) < int(_decode(model)[1].sum())
        assert float((hidden[0] - plain[0]).abs().max()) <= 1e-5  # row 0 has no image
        assert float((hidden - plain).abs().max()) > 1e-4


def test_layer_windows_follow_each_family():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    assert layer_windows(Qwen2Config(num_hidden_layers=4, use_sliding_window=False), 4) == [None] * 4
    qwen = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert layer_windows(qwen, 4) == [None, None, 8, 8]
    assert layer_windows(MistralConfig(num_hidden_layers=3, sliding_window=8), 3) == [8, 8, 8]
    assert layer_windows(Gemma2Config(num_hidden_layers=4, sliding_window=8), 4) == [8, None, 8, None]
    assert layer_windows(LlamaConfig(num_hidden_layers=2), 2) == [None, None]


def test_allowed_mask_windows_on_original_indices_and_never_leaves_a_row_empty():
    idx = torch.tensor([[0, 1, 3, 6]])  # gathered rows keep their original indices
    ok = torch.tensor([[True, True, True, False]])
    m = allowed_mask(idx, idx, ok, causal=True, window=3)[0, 0]
    assert m.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, True, True, False],  # 3 sees 1..3
        [False, False, False, True],  # 6 sees 4..6: nothing alive but itself
    ]
    both = allowed_mask(idx, idx, torch.ones(1, 4, dtype=torch.bool), causal=False, window=3)[0, 0]
    assert both[1].tolist() == [True, True, True, False]

"""Token pruning inside the LLM (AIM): keep-all equals the plain forward; ``fast`` really removes pruned rows."""

from __future__ import annotations

import pytest
import torch

from mmembed.config import ConfigError
from mmembed.tokens.prune import AIMPruner, aim_schedule
from tests.tiny_models import build, rows


def test_aim_schedule_matches_the_reference():
    rho = aim_schedule(28, 14, 0.125)
    assert rho[:14] == [1.0] * 14 and rho[14] == 0.875 and rho[20] == 0.125 and rho[21:] == [0.0] * 7


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_keep_all_schedule_equals_the_unpruned_forward(impl):
    plain = build(f"model.backbone.attn_implementation={impl}")
    pruned = build(f"model.backbone.attn_implementation={impl}", "model.prune={type: aim, schedule: [1.0, 1.0]}")
    pruned.load_state_dict(plain.state_dict())
    texts, images, instr = rows()
    a = plain.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    b = pruned.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a - b).max() <= 1e-5


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_pruning_removes_visual_rows_keeps_text_and_is_batch_and_padding_invariant(mode):
    """``fast`` really removes the pruned rows; ``exact`` keeps them as rows (masked as keys, as the reference)."""
    spec = f"model.prune={{type: aim, schedule: [0.25], mode: {mode}}}"
    model = build(spec, "model.pooler.type=mean")
    lengths = []
    hook = model.backbone.model.layers[1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    batch = model.processor(model._rows(["a red circle", "x"], [rows()[1][1], None], None))
    visual = batch["input_ids"] == model.processor.placeholder_id
    with torch.no_grad():
        h, attn, _ = model.backbone(batch, model.visual(batch), pruner=model.prune)
    kept = attn.bool()  # real tokens still present at the last layer
    hook.remove()
    length = batch["input_ids"].shape[1]
    # 16 visual rows -> 4 kept after layer 0; row 1 has none
    assert lengths == ([length - 12] if mode == "fast" else [length])
    text = batch["attention_mask"].bool() & ~visual
    assert kept[text].all() and int(kept[0][visual[0]].sum()) == 4
    texts, images, instr = rows()
    right = build(spec, "model.pooler.type=mean", "model.padding_side=right")
    right.load_state_dict(model.state_dict())
    a = model.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a - model.encode(texts=texts, images=images, instruction=instr, batch_size=1)).max() <= 1e-5
    assert abs(a - right.encode(texts=texts, images=images, instruction=instr, batch_size=2)).max() <= 1e-5


def test_schedule_longer_than_the_backbone_fails_naming_the_key():
    with pytest.raises(ConfigError) as e:
        build("model.prune={type: aim, schedule: [1.0, 0.5, 0.25]}")
    assert e.value.key == "model.prune.schedule" and "2 layers" in e.value.message
    with pytest.raises(ConfigError, match="model.prune.schedule"):
        build("model.prune={type: aim, schedule: [1.5]}")


def test_importance_prefers_attended_tokens():
    red = AIMPruner(num_layers=1, temperature=1.0)
    q = torch.zeros(1, 1, 4, 2)
    k = torch.zeros(1, 1, 4, 2)
    q[..., 0] = 1.0
    k[0, 0, 1, 0] = 5.0  # every query attends to token 1
    valid = torch.ones(1, 4, dtype=torch.bool)
    allowed = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    score = red.importance(q, k, allowed, valid)
    assert int(score.argmax()) == 1


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral", "phi3", "qwen3", "gemma"])
def test_pruning_scores_read_the_attention_the_model_computes(family):
    """The rotated queries and keys behind the importance score give the model's own attention probabilities
    (eager attention weights of layer 0), for each decoder family, Phi-3's fused qkv_proj included."""
    from mmembed.tokens.layers import layer_qk

    extra = {"gemma": ["model.backbone.config.head_dim=16"], "phi3": ["model.backbone.config.pad_token_id=0"]}
    model = build(
        f"model.backbone.config.model_type={family}", "model.backbone.attn_implementation=eager", *extra.get(family, [])
    )
    lm = model.backbone.model
    batch = model.processor(model._rows(["a red circle on the left", "x"], [rows()[1][1], None], None))
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        embeds = model.backbone.splice(batch, model.visual(batch)).embeds
        ref = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_attentions=True).attentions[0]
        q, k = layer_qk(lm.layers[0], embeds, lm.rotary_emb(embeds, pos))
    logits = (q @ k.transpose(-1, -2)) * lm.layers[0].self_attn.scaling
    n = mask.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    ours = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    rows_ok = mask.bool()  # padding query rows differ by convention only
    assert float((ours - ref).abs().permute(0, 2, 1, 3)[rows_ok].max()) <= 1e-5


@pytest.mark.parametrize("family", ["phi3", "gemma"])
def test_keep_all_equals_the_unpruned_forward_for_phi3_and_gemma(family):
    extra = {"gemma": ["model.backbone.config.head_dim=16"], "phi3": ["model.backbone.config.pad_token_id=0"]}
    over = [f"model.backbone.config.model_type={family}", *extra[family]]
    plain = build(*over)
    keep = build(*over, "model.prune={type: aim, schedule: [1.0, 1.0]}")
    prune = build(*over, "model.prune={type: aim, schedule: [0.25]}")
    keep.load_state_dict(plain.state_dict())
    prune.load_state_dict(plain.state_dict())
    texts, images, instr = rows()
    a = plain.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    b = keep.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    c = prune.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a - b).max() <= 1e-5
    assert abs(a - c).max() > 1e-4 and abs(a[0] - c[0]).max() <= 1e-5  # row 0 has no image: nothing to prune

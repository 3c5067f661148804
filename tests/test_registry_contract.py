"""Every registered component, through shape, finite output, backward and a save/load round trip.

Components list their tiny offline settings in ``example_args``; a registered name without them
fails here, so a new component is tested the moment it is registered (timm's registry-wide tests).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from mmembed.build import instantiate
from mmembed.registry import ALL

CASES = [
    (slot, name, i)
    for slot, reg in ALL.items()
    for name in reg.names()
    for i in range(max(1, len(getattr(reg.get(name), "example_args", []))))
]


def _build(slot, name, i, **injected):
    reg = ALL[slot]
    examples = getattr(reg.get(name), "example_args", None)
    assert examples, f"{slot} '{name}' has no example_args for the contract test"
    torch.manual_seed(0)
    return instantiate(reg, {"type": name, **examples[i]}, **injected), examples[i]


def _roundtrip(module, rebuild):
    """State dict through safetensors bytes into a module rebuilt from its exported args."""
    blob = st_save_bytes({k: v.contiguous() for k, v in module.state_dict().items()})
    other = rebuild()
    other.load_state_dict(st_load_bytes(blob), strict=True)
    return other.eval()


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("slot,name,i", CASES, ids=[f"{s}-{n}-{i}" for s, n, i in CASES])
def test_contract(slot, name, i, tmp_path):
    if slot == "vision":
        enc, args = _build(slot, name, i)
        x = torch.randn(2, 3, enc.image_size, enc.image_size)
        out = enc(x)
        h, w = enc.grid()
        assert out.shape == (2, h * w, enc.out_dim)
        assert enc.global_feature(x).shape[0] == 2
        rebuild = lambda: instantiate(ALL[slot], {"type": name, **enc.export_args()})  # noqa: E731
        run = lambda m: m(x)  # noqa: E731
        module = enc
    elif slot == "connector":
        conn, args = _build(slot, name, i, in_dim=24, out_dim=32)
        grid = (4, 4)
        x = torch.randn(2, 16, 24)
        out = conn(x, grid)
        assert out.shape == (2, conn.num_tokens(grid), 32)
        rebuild = lambda: instantiate(ALL[slot], {"type": name, **args}, in_dim=24, out_dim=32)  # noqa: E731
        run = lambda m: m(x, grid)  # noqa: E731
        module = conn
    elif slot == "pooler":
        pooler, args = _build(slot, name, i, dim=32, num_layers=2)
        layers = tuple(torch.randn(3, 7, 32) for _ in range(2))
        hidden = layers if pooler.needs_all_layers else layers[-1]
        am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
        pm = am.clone()
        pm[:, :3] = 0
        out = pooler(hidden, am, pm)
        assert out.shape == (3, 32)
        rebuild = lambda: instantiate(ALL[slot], {"type": name, **args}, dim=32, num_layers=2)  # noqa: E731
        run = lambda m: m(hidden, am, pm)  # noqa: E731
        module = pooler
        if not list(pooler.parameters()):  # parameter-free poolers: gradient flows to the input instead
            hidden_leaf = layers[-1].clone().requires_grad_()
            pooler(
                tuple(layers[:-1]) + (hidden_leaf,) if pooler.needs_all_layers else hidden_leaf, am, pm
            ).sum().backward()
            assert hidden_leaf.grad is not None and hidden_leaf.grad.abs().sum() > 0
    elif slot == "backbone":
        bb, args = _build(slot, name, i)
        ph = bb.add_placeholder("<image>")
        ids = torch.randint(4, 300, (2, 6))
        ids[0, 2] = ph
        am = torch.ones_like(ids)
        pos = (am.cumsum(-1) - 1).clamp_min(0)
        out = bb.language_forward(bb.embed(ids), am, pos)
        assert out.shape == (2, 6, bb.hidden_size)
        layers = bb.language_forward(bb.embed(ids), am, pos, all_layers=True)
        assert len(layers) == bb.num_layers and torch.allclose(layers[-1], out, atol=1e-5)

        # the backbone contract: a processor batch (+ visual rows) -> (hidden, attention_mask, pool_mask)
        from mmembed.config import ModelCfg
        from mmembed.processing import make_processor
        from mmembed.types import Side
        from tests.conftest import make_image

        visual = bb.visual_path(None, None, None, None)
        processor = make_processor(bb, visual, ModelCfg(backbone={"type": name}))
        with_image = processor.transform is not None or bb.processor == "hf"  # composed without vision: text only
        sides = [Side(text="a red circle", images=[make_image(0)] if with_image else []), Side(text="blue")]
        batch = processor(sides)
        if with_image:
            assert int((batch["input_ids"] == ph).sum()) > 0, "the image token id must match the processor's"
        hidden, mask, pool = bb(batch, visual(batch) if visual is not None else None)
        assert hidden.shape == (*batch["input_ids"].shape, bb.hidden_size) and torch.isfinite(hidden).all()
        assert mask.shape == pool.shape == batch["input_ids"].shape

        def rebuild():
            export = bb.export(tmp_path)
            export = {
                **export,
                **{k: str(tmp_path / export[k]) for k in ("name", "tokenizer", "processor") if k in export},
            }
            other = instantiate(ALL[slot], {"type": name, **export})
            assert other.add_placeholder("<image>") == ph
            return other

        run = lambda m: m.language_forward(m.embed(ids), am, pos)  # noqa: E731
        module = bb
    elif slot == "loss":
        loss_fn, args = _build(slot, name, i)
        k = 2
        q = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1).requires_grad_()
        t = torch.nn.functional.normalize(torch.randn(4 * (1 + k), 16), dim=-1)
        out = loss_fn(q, t)
        assert out.ndim == 0
        out.backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
        rebuild = lambda: instantiate(ALL[slot], {"type": name, **args})  # noqa: E731
        run = lambda m: m(q.detach(), t)  # noqa: E731
        module = loss_fn
        out = run(module)
    elif slot == "merge":
        red, args = _build(slot, name, i)
        x = torch.randn(2, 16, 32)
        out = red(x)
        assert out.shape == (2, red.num_tokens(16), 32)
        merged, index = red.reduce(x)
        assert torch.equal(merged, out) and index.shape == (2, red.num_tokens(16))
        assert bool((index[:, 1:] > index[:, :-1]).all()), "survivors keep their original order"
        run = lambda m: m(x)  # noqa: E731
        rebuild = lambda: instantiate(ALL[slot], {"type": name, **args})  # noqa: E731
        module = red
    elif slot == "prune":
        red, args = _build(slot, name, i, num_layers=2)
        q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
        valid = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        allowed = (valid[:, None, None, :] & causal) | torch.eye(6, dtype=torch.bool)
        assert len(red.keep_ratios) == 2 and all(0.0 <= r <= 1.0 for r in red.keep_ratios)
        score = red.importance(q, k, allowed, valid)
        assert score.shape == (2, 6) and bool(score[0, 0] == -1.0) and bool((score[:, 1:] >= 0).all())
        out = score
        run = lambda m: m.importance(q, k, allowed, valid)  # noqa: E731
        rebuild = lambda: instantiate(ALL[slot], {"type": name, **args}, num_layers=2)  # noqa: E731
        module = red
    elif slot == "fusion":
        fusion, args = _build(slot, name, i, dim=32, vision_dim=24)
        text, img = torch.randn(3, 32), torch.randn(3, 24)
        has = torch.tensor([True, False, True])
        out = fusion(text, img, has)
        assert out.shape == (3, 32)
        assert torch.equal(out[1], text[1]), "a row without an image must pass through"
        rebuild = lambda: instantiate(ALL[slot], {"type": name, **args}, dim=32, vision_dim=24)  # noqa: E731
        run = lambda m: m(text, img, has)  # noqa: E731
        module = fusion
    else:
        pytest.fail(f"no contract for slot '{slot}': add its case to this test when registering the first one")
    assert torch.isfinite(out).all()
    if slot != "loss" and list(module.parameters()):
        module.zero_grad()
        run(module).float().pow(2).mean().backward()
        grads = _grads(module)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the parameters"
    module.eval()
    with torch.no_grad():
        before = run(module)
        after = run(_roundtrip(module, rebuild))
    assert torch.allclose(before, after, atol=1e-6), "save/load round trip changed the output"

"""GradCache on one process (equivalence with the full-batch step, RNG replay, hooks) and the DeepSpeed config.

The multi-rank checks (cross-rank loss, GradCache through the DeepSpeed engine on ZeRO 0/2/3) are in tests/multirank.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmembed.losses import InfoNCELoss
from mmembed.train import gradcache as gc
from mmembed.train.deepspeed_utils import build_deepspeed_config, gradcache_engine_hooks

D_IN, D_OUT = 12, 6


class Encoder(nn.Module):
    """Tiny MLP with dropout; (n, D_IN) -> (n, D_OUT) L2-normalized."""

    def __init__(self, p: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, 24), nn.GELU(), nn.Dropout(p), nn.Linear(24, D_OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def batch(n: int = 8, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, D_IN, generator=g)
    t = torch.randn(n, 1 + k, D_IN, generator=g)
    t[:, 0] += q
    return q, t.reshape(-1, D_IN)


def sgd_step(model: nn.Module, lr: float = 0.5) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def plain_step(model: nn.Module, loss_mod: nn.Module, q: torch.Tensor, t: torch.Tensor, chunk: int | None, seed: int):
    """The full-batch step in one graph; ``chunk`` encodes in the same pieces as GradCache (same dropout masks)."""
    torch.manual_seed(seed)
    qe = torch.cat([model(c) for c in q.split(chunk or len(q))])
    te = torch.cat([model(c) for c in t.split(chunk or len(t))])
    loss = loss_mod(qe, te)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("learnable", [False, True])
def test_gradcache_step_equals_full_batch_step_with_dropout(learnable: bool) -> None:
    torch.manual_seed(0)
    model = Encoder()
    loss_mod = InfoNCELoss(temperature=0.05, learnable_temperature=learnable)
    ref_model, ref_loss_mod = copy.deepcopy(model), copy.deepcopy(loss_mod)
    q, t = batch()

    torch.manual_seed(11)
    res = gc.gradcache_step(model, q, t, partial(loss_mod, return_stats=True), chunk_size=2)
    ref_loss = plain_step(ref_model, ref_loss_mod, q, t, chunk=2, seed=11)

    assert res.num_chunks == 4 + 12
    torch.testing.assert_close(res.loss, ref_loss, rtol=1e-6, atol=0)
    assert set(res.stats) >= {"loss", "accuracy", "scale"}
    grads = {n: p.grad for n, p in model.named_parameters()}
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    assert rel(grads, ref_grads) <= 1e-5
    if learnable:
        torch.testing.assert_close(loss_mod.log_scale.grad, ref_loss_mod.log_scale.grad, rtol=1e-5, atol=0)
    assert rel(sgd_step(model), sgd_step(ref_model)) <= 1e-5


def test_without_dropout_gradcache_equals_one_forward_of_the_whole_batch() -> None:
    torch.manual_seed(0)
    model = Encoder(p=0.0)
    ref_model = copy.deepcopy(model)
    q, t = batch(n=6, k=1)
    gc.gradcache_step(model, q, t, InfoNCELoss(), chunk_size=4)  # uneven last chunks
    plain_step(ref_model, InfoNCELoss(), q, t, chunk=None, seed=0)
    assert rel(sgd_step(model), sgd_step(ref_model)) <= 1e-5


def test_rng_replay_is_what_makes_dropout_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Encoder(p=0.5)
    ref_model = copy.deepcopy(model)
    q, t = batch()
    monkeypatch.setattr(gc.RngState, "restore", lambda self: None)
    torch.manual_seed(11)
    gc.gradcache_step(model, q, t, InfoNCELoss(), chunk_size=2)
    plain_step(ref_model, InfoNCELoss(), q, t, chunk=2, seed=11)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert rel(grads, {n: p.grad for n, p in ref_model.named_parameters()}) > 1e-2


def test_rng_stream_continues_as_after_one_encoding_pass() -> None:
    model = Encoder()
    q, t = batch()
    torch.manual_seed(5)
    gc.gradcache_step(model, q, t, InfoNCELoss(), chunk_size=3)
    after_gc = torch.rand(4)
    torch.manual_seed(5)
    with torch.no_grad():
        for c in [*q.split(3), *t.split(3)]:
            model(c)
    torch.testing.assert_close(after_gc, torch.rand(4))


def test_hooks_order_target_chunks_and_loss_parameter_gradient_through_backward_fn() -> None:
    torch.manual_seed(0)
    model = Encoder()
    loss_mod = InfoNCELoss(learnable_temperature=True)
    ref_model, ref_loss_mod = copy.deepcopy(model), copy.deepcopy(loss_mod)
    q, t = batch(n=4, k=1)
    calls: list[tuple[int, bool]] = []
    seen_temperature_grad: list[bool] = []

    def backward_fn(x: torch.Tensor) -> None:
        seen_temperature_grad.append(loss_mod.log_scale.grad is not None)
        x.backward()

    def encode(b: dict) -> torch.Tensor:
        return model(b["x"])

    torch.manual_seed(2)
    res = gc.gradcache_step(
        encode,
        {"x": q, "name": "queries"},
        {"x": t, "name": "targets"},
        loss_mod,
        chunk_size=3,
        target_chunk_size=5,
        backward_fn=backward_fn,
        before_backward=lambda i, last: calls.append((i, last)),
    )
    n_chunks = math.ceil(4 / 3) + math.ceil(8 / 5)
    assert res.num_chunks == n_chunks and res.stats == {}
    assert calls == [(i, i == n_chunks - 1) for i in range(n_chunks)]
    # the temperature's gradient is never written directly, it arrives with the last backward_fn call
    assert seen_temperature_grad == [False] * n_chunks and loss_mod.log_scale.grad is not None
    torch.manual_seed(2)
    ref_qe = torch.cat([ref_model(c) for c in q.split(3)])
    ref_te = torch.cat([ref_model(c) for c in t.split(5)])
    ref_loss_mod(ref_qe, ref_te).backward()
    torch.testing.assert_close(loss_mod.log_scale.grad, ref_loss_mod.log_scale.grad, rtol=1e-5, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert rel(grads, {n: p.grad for n, p in ref_model.named_parameters()}) <= 1e-5


def test_split_batch() -> None:
    b = {"ids": torch.arange(10).view(5, 2), "texts": list("abcde"), "pad": 0, "mask": None}
    chunks = gc.split_batch(b, 2)
    assert [c["texts"] for c in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert torch.equal(chunks[2]["ids"], torch.tensor([[8, 9]]))
    assert all(c["pad"] == 0 and c["mask"] is None for c in chunks)
    assert len(gc.split_batch(torch.zeros(5, 3), 8)) == 1
    with pytest.raises(ValueError, match="row counts"):
        gc.split_batch({"a": torch.zeros(4), "b": torch.zeros(6)}, 2)
    with pytest.raises(ValueError, match="gradcache_chunk_size"):
        gc.split_batch(torch.zeros(4), 0)


def test_deepspeed_config_is_explicit() -> None:
    cfg = build_deepspeed_config(micro_batch_size=8, zero_stage=3, stage3_param_persistence_threshold=0)
    assert cfg["gradient_clipping"] == 0.0  # never absent: 0.19.8 would clip to 1.0
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert cfg["zero_allow_untested_optimizer"] is True and cfg["bf16"]["enabled"] is False
    bf16 = build_deepspeed_config(
        micro_batch_size=2, precision="bf16", gradient_clipping=1.0, extra={"zero_optimization": {"x": 1}}
    )
    assert bf16["bf16"]["enabled"] and bf16["gradient_clipping"] == 1.0
    assert bf16["zero_optimization"] == {"stage": 0, "x": 1}
    with pytest.raises(ValueError, match="train.zero_stage"):
        build_deepspeed_config(micro_batch_size=1, zero_stage=4)
    with pytest.raises(ValueError, match="train.precision"):
        build_deepspeed_config(micro_batch_size=1, precision="fp8")


def test_engine_hooks_set_the_boundary_before_each_backward() -> None:
    log: list = []

    class FakeEngine:
        def set_gradient_accumulation_boundary(self, flag: bool) -> None:
            log.append(("boundary", flag))

        def backward(self, x: torch.Tensor) -> None:
            log.append(("backward",))
            x.backward()

    model = Encoder()
    q, t = batch(n=2, k=1)
    gc.gradcache_step(model, q, t, InfoNCELoss(), chunk_size=2, **gradcache_engine_hooks(FakeEngine()))
    expected = [("boundary", False), ("backward",), ("boundary", False), ("backward",)]
    assert log == expected + [("boundary", True), ("backward",)]


def test_loss_wrapped_in_a_function_needs_explicit_loss_params() -> None:
    """The training loop wraps the loss module in a plain function; its temperature is then named explicitly."""
    torch.manual_seed(0)
    model = Encoder()
    loss_mod = InfoNCELoss(learnable_temperature=True)
    ref_model, ref_loss_mod = copy.deepcopy(model), copy.deepcopy(loss_mod)
    q, t = batch(n=4, k=1)
    mask = torch.tensor([[True], [False], [True], [True]])

    def checked(module: nn.Module, negative_mask: torch.Tensor, qe: torch.Tensor, te: torch.Tensor):
        return module(qe, te, negative_mask=negative_mask, return_stats=True)

    torch.manual_seed(4)
    res = gc.gradcache_step(
        model, q, t, partial(checked, loss_mod, mask), chunk_size=2, loss_params=list(loss_mod.parameters())
    )
    assert res.stats["padded_targets"] == 1
    torch.manual_seed(4)
    qe = torch.cat([ref_model(c) for c in q.split(2)])
    te = torch.cat([ref_model(c) for c in t.split(2)])
    ref_loss_mod(qe, te, negative_mask=mask).backward()
    torch.testing.assert_close(loss_mod.log_scale.grad, ref_loss_mod.log_scale.grad, rtol=1e-5, atol=0)
    assert (
        rel({n: p.grad for n, p in model.named_parameters()}, {n: p.grad for n, p in ref_model.named_parameters()})
        <= 1e-5
    )

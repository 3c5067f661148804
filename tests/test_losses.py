"""InfoNCE loss: sanity values, the grouped hard-negative layout, options, and the single-process collectives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmembed import dist as mdist
from mmembed.losses import InfoNCELoss
from mmembed.registry import LOSSES


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def hand_infonce(q: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-query softmax over all targets written out as a loop; positive of query i is row i * group."""
    group = t.shape[0] // q.shape[0]
    losses = []
    for i in range(q.shape[0]):
        logits = (t @ q[i]) / tau
        losses.append(torch.logsumexp(logits, 0) - logits[i * group])
    return torch.stack(losses).mean()


def test_registered_and_config_args_validate() -> None:
    assert LOSSES.get("infonce") is InfoNCELoss
    assert LOSSES.check_args("infonce", {"temperature": 0.05, "in_batch_negatives": False}) == []
    problems = LOSSES.check_args("infonce", {"temprature": 0.05})
    assert problems and "temperature" in problems[0]


def test_positives_that_copy_the_queries_give_near_zero_loss() -> None:
    q = unit(32, 512)
    negs = unit(32, 3, 512, seed=1)
    t = torch.cat([q[:, None], negs], dim=1).reshape(-1, 512)  # [pos = q_i, 3 random negatives] per query
    loss, stats = InfoNCELoss()(q, t, return_stats=True)  # tau = 0.02
    assert loss.item() < 1e-4
    assert stats["accuracy"].item() == 1.0
    assert stats["grad_scale"] == 1 and stats["num_targets"] == 128


@pytest.mark.parametrize("in_batch", [True, False])
def test_random_embeddings_give_log_of_candidate_count(in_batch: bool) -> None:
    b, k, d = 64, 3, 4096
    q, t = unit(b, d), unit(b * (1 + k), d, seed=1)
    n_candidates = b * (1 + k) if in_batch else 1 + k
    # tau large: logits are nearly equal, so the loss is log(number of candidates) up to O(1/tau^2 D).
    loss = InfoNCELoss(temperature=1.0, in_batch_negatives=in_batch)(q, t)
    assert abs(loss.item() - math.log(n_candidates)) < 0.01
    if in_batch:
        # tau = 0.02: random cosines have variance 1/D, logits variance s2 = 1/(D tau^2); the loss of a
        # random positive is then about log(C) + s2 / 2 (log-mean-exp of a Gaussian).
        s2 = 1.0 / (d * 0.02**2)
        loss = InfoNCELoss(temperature=0.02)(q, t)
        assert abs(loss.item() - (math.log(n_candidates) + s2 / 2)) < 0.15


def test_hard_negative_layout_matches_hand_computation() -> None:
    b, k, d = 5, 2, 16
    q, t = unit(b, d), unit(b * (1 + k), d, seed=2)
    loss = InfoNCELoss(temperature=0.1)(q, t)
    torch.testing.assert_close(loss, hand_infonce(q, t, 0.1))
    # the positive is the first row of each group: putting it last changes the loss
    swapped = t.view(b, 1 + k, d).flip(1).reshape(-1, d)
    assert not torch.allclose(InfoNCELoss(temperature=0.1)(q, swapped), loss)
    # a query's own group is also scored against every other query (in-batch and their hard negatives)
    logits = q @ t.T / 0.1
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(b) * (1 + k)))


def test_in_batch_off_is_a_softmax_over_each_group() -> None:
    b, k, d = 6, 3, 16
    q, t = unit(b, d), unit(b * (1 + k), d, seed=3)
    loss, stats = InfoNCELoss(temperature=0.05, in_batch_negatives=False)(q, t, return_stats=True)
    groups = t.view(b, 1 + k, d)
    expected = torch.stack([-torch.log_softmax(groups[i] @ q[i] / 0.05, 0)[0] for i in range(b)]).mean()
    torch.testing.assert_close(loss, expected)
    assert 0.0 <= stats["accuracy"].item() <= 1.0


def test_symmetric_term_adds_targets_against_queries() -> None:
    b, k, d = 4, 1, 16
    q, t = unit(b, d), unit(b * (1 + k), d, seed=4)
    loss = InfoNCELoss(temperature=0.1, symmetric=True)(q, t)
    pos = t.view(b, 1 + k, d)[:, 0]
    expected = 0.5 * (hand_infonce(q, t, 0.1) + F.cross_entropy(pos @ q.T / 0.1, torch.arange(b)))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="in_batch_negatives"):
        InfoNCELoss(symmetric=True, in_batch_negatives=False)


def test_false_negative_masking_drops_only_negatives_above_the_margin() -> None:
    d = 8
    e = torch.eye(d)
    q = e[:2]  # two queries
    # query 0: positive at cos 0.6, its hard negative at cos 0.9 (a false negative), query 1 clean
    pos0 = F.normalize(0.6 * e[0] + 0.8 * e[2], dim=0)
    neg0 = F.normalize(0.9 * e[0] + math.sqrt(1 - 0.81) * e[3], dim=0)
    t = torch.stack([pos0, neg0, e[1], e[4]])  # groups [pos0, neg0], [pos1, neg1]
    loss, stats = InfoNCELoss(temperature=0.1, false_negative_margin=0.1)(q, t, return_stats=True)
    assert stats["masked"] == 1
    logits = q @ t.T / 0.1
    expected = 0.5 * (
        (torch.logsumexp(logits[0, [0, 2, 3]], 0) - logits[0, 0]) + (torch.logsumexp(logits[1], 0) - logits[1, 2])
    )
    torch.testing.assert_close(loss, expected)
    # a margin larger than the gap masks nothing
    loose, stats = InfoNCELoss(temperature=0.1, false_negative_margin=0.5)(q, t, return_stats=True)
    assert stats["masked"] == 0
    torch.testing.assert_close(loose, InfoNCELoss(temperature=0.1)(q, t))
    # the masked entry gets no gradient
    tg = torch.stack([pos0, neg0, e[5], e[1], e[4], e[6]]).requires_grad_()  # groups [pos, false neg, neg]
    InfoNCELoss(temperature=0.1, false_negative_margin=0.1, in_batch_negatives=False)(q, tg).backward()
    assert torch.count_nonzero(tg.grad[1]) == 0
    assert torch.count_nonzero(tg.grad[0]) > 0 and torch.count_nonzero(tg.grad[2]) > 0


def test_learnable_temperature_gets_a_gradient_and_is_clamped() -> None:
    q, t = unit(8, 16), unit(16, 16, seed=5)
    fixed = InfoNCELoss(temperature=0.05)
    assert fixed.log_scale is None and list(fixed.parameters()) == []
    loss_mod = InfoNCELoss(temperature=0.05, learnable_temperature=True, max_scale=100.0)
    assert math.isclose(loss_mod.scale, 20.0, rel_tol=1e-6)
    torch.testing.assert_close(loss_mod(q, t), fixed(q, t))
    loss_mod(q, t).backward()
    assert loss_mod.log_scale.grad is not None and loss_mod.log_scale.grad.abs().item() > 0
    with torch.no_grad():
        loss_mod.log_scale.fill_(math.log(1000.0))
    loss_mod.log_scale.grad = None
    loss, stats = loss_mod(q, t, return_stats=True)
    assert stats["scale"] == 100.0 and loss_mod.scale == 100.0
    torch.testing.assert_close(loss, InfoNCELoss(temperature=0.01)(q, t))
    loss.backward()
    assert loss_mod.log_scale.grad.item() == 0.0  # clamped: no push beyond max_scale
    with pytest.raises(ValueError, match="max_scale"):
        InfoNCELoss(temperature=0.001, learnable_temperature=True)


def test_bf16_embeddings_use_float32_logits_and_get_gradients() -> None:
    q = unit(4, 16).bfloat16().requires_grad_()
    t = unit(8, 16, seed=6).bfloat16().requires_grad_()
    loss = InfoNCELoss()(q, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="Bt = Bq"):
        InfoNCELoss()(unit(3, 8), unit(4, 8))
    with pytest.raises(ValueError, match=r"\(Bq, D\)"):
        InfoNCELoss()(unit(3, 8), unit(3, 4))
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)


def test_collectives_are_single_process_no_ops() -> None:
    assert not mdist.is_distributed()
    assert (mdist.get_rank(), mdist.get_world_size(), mdist.is_main_process()) == (0, 1, True)
    x = torch.randn(3, 2, requires_grad=True)
    assert mdist.all_gather_with_local_grad(x) is x
    assert mdist.broadcast_object({"a": 1}) == {"a": 1}
    y = mdist.all_reduce_mean(x)
    torch.testing.assert_close(y, x.detach())
    assert y is not x and not y.requires_grad
    mdist.barrier()
    # gather=True without a process group: plain loss, no world-size factor
    loss, stats = InfoNCELoss()(unit(4, 8), unit(4, 8, seed=1), return_stats=True)
    assert stats["grad_scale"] == 1 and torch.equal(loss.detach(), stats["loss"])


@pytest.mark.parametrize("in_batch", [True, False])
def test_negative_mask_drops_padding_slots_for_every_query(in_batch: bool) -> None:
    b, k, d = 4, 2, 16
    q = unit(b, d)
    t = unit(b, 1 + k, d, seed=7)
    t[1, 1:] = t[1, 0]  # query 1 had no negatives: the collator pads with copies of its positive
    t[3, 2] = t[3, 0]
    t = t.reshape(-1, d).clone().requires_grad_()
    mask = torch.tensor([[True, True], [False, False], [True, True], [True, False]])
    loss_mod = InfoNCELoss(temperature=0.1, in_batch_negatives=in_batch)
    loss, stats = loss_mod(q, t, negative_mask=mask, return_stats=True)
    assert stats["padded_targets"] == 3
    keep = torch.cat([torch.ones(b, 1, dtype=torch.bool), mask], 1).reshape(-1)
    logits = q @ t.detach().T / 0.1
    per_query = []
    for i in range(b):
        cols = keep.clone() if in_batch else torch.zeros_like(keep).index_fill_(0, torch.arange(i * 3, i * 3 + 3), True)
        cols &= keep
        per_query.append(torch.logsumexp(logits[i, cols], 0) - logits[i, i * 3])
    torch.testing.assert_close(loss, torch.stack(per_query).mean())
    loss.backward()
    assert torch.count_nonzero(t.grad[~keep]) == 0  # padding rows take no part
    all_real = torch.ones(b, k, dtype=torch.bool)
    torch.testing.assert_close(loss_mod(q, t, negative_mask=all_real), loss_mod(q, t))
    with pytest.raises(ValueError, match="negative_mask"):
        loss_mod(q, t, negative_mask=all_real[:, :1])


def test_identical_targets_are_not_negatives_of_each_other():
    """Two queries of one class share the label text: each one's positive is masked out of the other's negatives
    (NV-Embed's false-negative rule), in both terms; without keys or with the option off nothing changes."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)  # [pos_i, neg_i] per query
    keys = torch.tensor([7, 1, 7, 2, 3, 4])  # the positives of queries 0 and 1 are the same content
    masked, stats = InfoNCELoss(temperature=0.1)(q, t, target_keys=keys, return_stats=True)
    plain = InfoNCELoss(temperature=0.1)(q, t)
    off = InfoNCELoss(temperature=0.1, mask_same_targets=False)(q, t, target_keys=keys)
    assert stats["same_targets"] == 2 and torch.equal(off, plain) and not torch.allclose(masked, plain)
    logits = (q @ t.T) / 0.1
    logits[0, 2] = logits[1, 0] = float("-inf")  # column 2 is query 1's positive = query 0's, and vice versa
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 4]))
    assert torch.allclose(masked, expected, atol=1e-6)
    sym = InfoNCELoss(temperature=0.1, symmetric=True)(q, t, target_keys=keys)
    scores_t = (t[0::2] @ q.T) / 0.1
    scores_t[0, 1] = scores_t[1, 0] = float("-inf")
    expected_t = torch.nn.functional.cross_entropy(scores_t, torch.arange(3))
    assert torch.allclose(sym, 0.5 * (expected + expected_t), atol=1e-6)

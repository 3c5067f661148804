"""Matryoshka InfoNCE (``loss.matryoshka_dims``): sentence-transformers' MatryoshkaLoss numbers, GradCache exactness,
cross-rank negatives, config validation, and the trained dims written with the exported model."""

from __future__ import annotations

import copy
import json
import logging
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmembed.config import load_recipe
from mmembed.losses import InfoNCELoss
from mmembed.train import gradcache as gc
from mmembed.types import ConfigError
from tests.conftest import TINY_RECIPE

D_IN, D = 12, 8
DIMS, WEIGHTS = [2, 8, 4], [0.25, 1.0, 0.5]  # any order: sorted widest first with their weights


class Encoder(nn.Module):
    """(n, D_IN) -> (n, D) L2-normalized, with dropout (GradCache must replay it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, 24), nn.GELU(), nn.Dropout(0.2), nn.Linear(24, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def _batch(n: int = 8, k: int = 1, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, D_IN, generator=g)
    t = torch.randn(n, 1 + k, D_IN, generator=g)
    t[:, 0] += q
    return q, t.reshape(-1, D_IN)


def _reference(q: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
    """sum_d w_d * InfoNCE(first d dims, re-normalized), spelled out with the plain loss."""
    plain = InfoNCELoss(**kw)
    return sum(w * plain(F.normalize(q[:, :d], dim=-1), F.normalize(t[:, :d], dim=-1)) for d, w in zip(DIMS, WEIGHTS))


def test_loss_is_the_weighted_sum_over_truncated_renormalized_prefixes() -> None:
    torch.manual_seed(0)
    q, t = F.normalize(torch.randn(6, D), dim=-1), F.normalize(torch.randn(12, D), dim=-1)
    for kw in ({}, {"symmetric": True, "false_negative_margin": 0.1}, {"in_batch_negatives": False}):
        loss = InfoNCELoss(matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS, **kw)
        out, stats = loss(q, t, return_stats=True)
        torch.testing.assert_close(out, _reference(q, t, **kw), rtol=1e-6, atol=1e-7)
        assert loss.matryoshka_dims == (8, 4, 2) and loss.matryoshka_weights == (1.0, 0.5, 0.25)
        assert set(stats["matryoshka_losses"]) == {8, 4, 2} and stats["loss"] == out.detach()
    full_only = InfoNCELoss(matryoshka_dims=[D])(q, t)  # the full width alone is the plain loss
    torch.testing.assert_close(full_only, InfoNCELoss()(q, t), rtol=1e-6, atol=1e-7)


def test_equals_sentence_transformers_matryoshka_loss_and_its_gradient() -> None:
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules.input_module import InputModule
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    class Table(InputModule):
        def __init__(self, table: torch.Tensor) -> None:
            super().__init__()
            self.table = nn.Parameter(table.clone())

        def preprocess(self, inputs: list[int], prompt: str | None = None, **kw: object) -> dict[str, torch.Tensor]:
            return {"idx": torch.tensor(inputs)}

        def forward(self, features: dict[str, torch.Tensor], **kw: object) -> dict[str, torch.Tensor]:
            return {**features, "sentence_embedding": self.table[features["idx"]]}

        def save(self, *args: object, **kwargs: object) -> None:
            pass

        def get_embedding_dimension(self) -> int:
            return D

    n, tau = 5, 0.05
    table = F.normalize(torch.randn(3 * n, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    model = st.SentenceTransformer(modules=[Table(table)], device="cpu")
    st_loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=1 / tau), DIMS, WEIGHTS)
    columns = [{"idx": torch.arange(c * n, (c + 1) * n)} for c in range(3)]  # anchor, positive, negative
    theirs = st_loss(columns, None)
    theirs.backward()

    ours_table = table.clone().requires_grad_()
    q, pos, neg = ours_table[:n], ours_table[n : 2 * n], ours_table[2 * n :]
    t = torch.stack([pos, neg], dim=1).reshape(2 * n, D)  # grouped [pos_i, neg_i]
    ours = InfoNCELoss(temperature=tau, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS)(q, t)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_table.grad, model[0].table.grad, rtol=1e-5, atol=1e-6)


def _plain_step(model: nn.Module, loss_fn: nn.Module, q: torch.Tensor, t: torch.Tensor, chunk: int, seed: int):
    torch.manual_seed(seed)
    qe = torch.cat([model(c) for c in q.split(chunk)])
    te = torch.cat([model(c) for c in t.split(chunk)])
    loss = loss_fn(qe, te)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("kw", [{}, {"learnable_temperature": True, "symmetric": True}])
def test_gradcache_step_equals_plain_step(kw: dict) -> None:
    torch.manual_seed(0)
    model = Encoder()
    loss_fn = InfoNCELoss(temperature=0.05, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS, **kw)
    ref_model, ref_loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    q, t = _batch()
    torch.manual_seed(11)
    res = gc.gradcache_step(model, q, t, partial(loss_fn, return_stats=True), chunk_size=3)
    ref = _plain_step(ref_model, ref_loss_fn, q, t, chunk=3, seed=11)
    torch.testing.assert_close(res.loss, ref, rtol=1e-6, atol=0)
    for (name, p), ref_p in zip(model.named_parameters(), ref_model.parameters()):
        assert float((p.grad - ref_p.grad).abs().max() / ref_p.grad.abs().max()) <= 1e-5, name
    if kw:
        torch.testing.assert_close(loss_fn.log_scale.grad, ref_loss_fn.log_scale.grad, rtol=1e-5, atol=0)


def test_cross_rank_negatives_give_the_global_batch_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks simulated in one process: each rank's gathered loss, scaled by W, and its local gradient / W equal
    the single-process loss and gradient of the global batch (the truncation happens after the gather)."""
    import mmembed.losses as losses

    torch.manual_seed(0)
    world, n, group = 2, 3, 2
    q_all = F.normalize(torch.randn(world * n, D), dim=-1)
    t_all = F.normalize(torch.randn(world * n * group, D), dim=-1)
    kw = dict(matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS, symmetric=True)
    ref_q, ref_t = q_all.clone().requires_grad_(), t_all.clone().requires_grad_()
    ref = InfoNCELoss(**kw)(ref_q, ref_t)
    ref.backward()
    monkeypatch.setattr(losses, "get_world_size", lambda: world)
    for rank in range(world):
        q = q_all[rank * n : (rank + 1) * n].clone().requires_grad_()
        t = t_all[rank * n * group : (rank + 1) * n * group].clone().requires_grad_()
        full = iter([q_all, t_all])

        def gather(x: torch.Tensor, full=full, rank=rank) -> torch.Tensor:
            parts = list(next(full).detach().chunk(world))
            parts[rank] = x  # the local rows keep their gradient
            return torch.cat(parts)

        monkeypatch.setattr(losses, "all_gather_with_local_grad", gather)
        loss = InfoNCELoss(**kw)(q, t)
        loss.backward()
        torch.testing.assert_close(loss / world, ref.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(q.grad / world, ref_q.grad[rank * n : (rank + 1) * n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(t.grad / world, ref_t.grad[rank * n * group : (rank + 1) * n * group])


@pytest.mark.parametrize(
    "loss, key, match",
    [
        ({"matryoshka_dims": []}, "loss.matryoshka_dims", "non-empty list of positive integers"),
        ({"matryoshka_dims": [32, 0]}, "loss.matryoshka_dims", "positive integers"),
        ({"matryoshka_dims": [32, 16.5]}, "loss.matryoshka_dims", "positive integers"),
        ({"matryoshka_dims": "32"}, "loss.matryoshka_dims", "list"),
        ({"matryoshka_dims": [32, 32]}, "loss.matryoshka_dims", "twice"),
        ({"matryoshka_weights": [1.0]}, "loss.matryoshka_weights", "needs matryoshka_dims"),
        ({"matryoshka_dims": [32, 16], "matryoshka_weights": [1.0]}, "loss.matryoshka_weights", "2 numbers"),
        ({"matryoshka_dims": [32, 16], "matryoshka_weights": [1.0, 0]}, "loss.matryoshka_weights", "> 0"),
        ({"matryoshka_dims": [64, 16]}, "loss.matryoshka_dims", r"exceeds the embedding width \(model.embed_dim=32"),
        ({"matryoshka_dim": [32]}, "loss", "did you mean 'matryoshka_dims'"),
    ],
)
def test_config_errors_name_the_key(loss: dict, key: str, match: str) -> None:
    recipe = {"model": {"backbone": {"type": "hf_causal_lm", "name": "tiny"}, "embed_dim": 32}}
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe({**recipe, "loss": {"type": "infonce", **loss}})
    assert e.value.key == key


def test_width_checked_at_the_first_forward_and_full_width_warned_once(caplog) -> None:
    q, t = F.normalize(torch.randn(4, D), dim=-1), F.normalize(torch.randn(8, D), dim=-1)
    with pytest.raises(ConfigError, match="16 exceeds the embedding dimension 8") as e:
        InfoNCELoss(matryoshka_dims=[16, 4])(q, t)
    assert e.value.key == "loss.matryoshka_dims"
    loss = InfoNCELoss(matryoshka_dims=[4, 2])
    with caplog.at_level(logging.WARNING, logger="mmembed.losses"):
        loss(q, t), loss(q, t)
    assert len([r for r in caplog.records if "leave out the full dimension 8" in r.getMessage()]) == 1


def test_exported_model_records_the_trained_dims(tmp_path) -> None:
    from mmembed.build import build_from_cfg
    from mmembed.train.export import export_state

    cfg = load_recipe(TINY_RECIPE, ["loss={type: infonce, matryoshka_dims: [16, 64, 32]}"])
    torch.manual_seed(0)
    out = export_state(cfg, build_from_cfg(cfg.model).state_dict(), tmp_path / "final")
    meta = json.loads((out / "mmembed_config.json").read_text())
    assert meta["matryoshka_dims"] == [64, 32, 16]
    assert "Matryoshka dimensions trained (`loss.matryoshka_dims`): 64, 32, 16" in (out / "README.md").read_text()

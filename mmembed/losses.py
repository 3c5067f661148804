"""Instruction-conditioned contrastive loss (InfoNCE) with hard and cross-rank negatives.

Sources (docs/algorithms.md §7, docs/mmeb.md §1.6): VLM2Vec's ``SimpleContrastiveLoss`` /
``DistributedContrastiveLoss`` (targets grouped ``[pos, neg_1..neg_k]`` per query, labels
``arange(Nq) * (1 + k)``, temperature 0.02, loss x world size), Tevatron's gather trick (the local
slot of the gathered tensor keeps its gradient), NV-Embed stage 2 (in-batch negatives off), CLIP
(log-parameterized learnable scale clamped at 100), the common false-negative filter
(mask ``s_ij > s_i+ + m``) and Matryoshka representation learning (Kusupati et al., NeurIPS 2022,
arXiv 2205.13147; sentence-transformers' ``MatryoshkaLoss``: the loss summed over truncated, re-normalized prefixes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmembed.dist import all_gather_with_local_grad, get_world_size
from mmembed.registry import LOSSES
from mmembed.types import ConfigError

__all__ = ["InfoNCELoss"]

log = logging.getLogger(__name__)


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, ``factor * grad`` in the backward pass."""
    return x.detach() + (x - x.detach()) * factor


def _shrink(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, D) -> (N, dim): the first ``dim`` columns, L2-normalized (sentence-transformers' Matryoshka ``shrink``)."""
    return F.normalize(x[:, :dim], p=2, dim=-1)


def _matryoshka(
    dims: Sequence[int] | None, weights: Sequence[float] | None
) -> tuple[tuple[int, ...] | None, tuple[float, ...] | None]:
    """Dims and weights (default 1 each) as tuples, widest first (the order does not change the sum)."""
    if dims is None:
        return None, None
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    pairs = sorted(zip((int(d) for d in dims), weights), key=lambda p: -p[0])
    return tuple(d for d, _ in pairs), tuple(w for _, w in pairs)


def _masked_cross_entropy(
    scores: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float,
    margin: float | None,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cross-entropy of ``scale * scores`` (N, C) against ``labels`` (N,), with masked candidates.

    ``exclude`` (bool, broadcastable to (N, C)) removes candidates outright (padding slots). With a
    ``margin``, a candidate ``j != labels[i]`` is also masked when ``scores[i, j] > scores[i, labels[i]] + margin``
    (a likely false negative). Masked logits are set to the dtype minimum, so they get no gradient.
    Returns (loss, number of correct top-1, number of margin-masked candidates).
    """
    logits = scores * scale
    n_masked = 0
    mask = None
    if margin is not None:
        with torch.no_grad():
            pos = scores.gather(1, labels[:, None])  # (N, 1)
            mask = scores > pos + margin
            if exclude is not None:
                mask &= ~exclude
            mask[torch.arange(scores.shape[0], device=scores.device), labels] = False
            n_masked = int(mask.sum().item())
    if exclude is not None:
        mask = exclude if mask is None else mask | exclude
    if mask is not None:
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    loss = F.cross_entropy(logits, labels)
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return loss, correct, n_masked


def _check_matryoshka(dims: Any, weights: Any) -> None:
    """``matryoshka_dims``: null or distinct positive integers; ``matryoshka_weights``: null or one number > 0 each."""
    if dims is None:
        if weights is not None:
            raise ConfigError("matryoshka_weights", "needs matryoshka_dims (one weight per dimension)")
        return
    if not isinstance(dims, (list, tuple)) or not dims or any(type(d) is not int or d < 1 for d in dims):
        example = "e.g. [768, 512, 256, 128, 64]"
        raise ConfigError("matryoshka_dims", f"must be a non-empty list of positive integers, {example}; got {dims!r}")
    if len(set(dims)) != len(dims):
        raise ConfigError("matryoshka_dims", f"lists a dimension twice: {list(dims)} (weight it instead)")
    if weights is not None and (not isinstance(weights, (list, tuple)) or len(weights) != len(dims)):
        raise ConfigError("matryoshka_weights", f"must be a list of {len(dims)} numbers (one per dim), got {weights!r}")
    for w in weights or ():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
            raise ConfigError("matryoshka_weights", f"must be numbers > 0 (leave a dim out instead of 0), got {w!r}")


@LOSSES.register("infonce")
class InfoNCELoss(nn.Module):
    """InfoNCE of queries against grouped targets, over the global batch of all ranks.

    Args:
        temperature: softmax temperature tau (logits = cosine / tau); VLM2Vec uses 0.02. With
            ``learnable_temperature`` it is the initial value.
        learnable_temperature: learn ``log(1/tau)`` (parameter ``log_scale`` of shape (1,)); the scale
            ``1/tau`` is clamped at ``max_scale`` in the forward pass (CLIP). The parameter must reach
            the optimizer: under DeepSpeed make the loss a submodule of the engine's model and call it
            as a module (ZeRO-3 then gathers the partitioned parameter through its module hooks; tested
            on ZeRO 0-3 with GradCache in tests/multirank).
        max_scale: upper bound of ``1/tau`` for a learnable temperature (ignored when fixed).
        in_batch_negatives: contrast each query with every target of the global batch (default).
            When False each query only sees its own group ``[pos, neg_1..neg_k]`` (NV-Embed stage 2),
            which needs ``k >= 1`` hard negatives to be informative.
        symmetric: add the target-side term (each query's positive against all queries) and average
            the two; needs ``in_batch_negatives``.
        false_negative_margin: if set, mask a negative whose cosine exceeds the positive's by more
            than this margin (e.g. 0.1), in both terms.
        mask_same_targets: with ``target_keys`` given, a candidate whose content equals the query's positive
            (two queries of one class share the label text) is not a negative: it is masked, in both terms
            (NV-Embed, arXiv 2405.17428 §3.2; NeMo Retriever). Set False to reproduce VLM2Vec, which keeps them.
        matryoshka_dims: train every prefix of these widths as an embedding (Matryoshka representation learning,
            Kusupati et al., NeurIPS 2022): the loss is ``sum_d w_d * InfoNCE(q[:, :d], t[:, :d])`` with both sides
            re-normalized after the cut (sentence-transformers' ``MatryoshkaLoss``), on the gathered global batch, so
            cross-rank negatives and GradCache need nothing else. Distinct positive integers in any order (kept widest
            first), each at most the embedding width; list the full width too, or it is not trained (a warning says
            so). ``None`` (default): the plain loss. The dims are written to the exported model directory.
        matryoshka_weights: ``w_d``, one positive number per dim (same order as ``matryoshka_dims``); default 1 each.
        gather: gather queries and targets from all ranks (when a process group exists). The local
            rows keep their gradient; the returned loss is multiplied by the world size so that the
            gradient averaged over ranks (DDP, DeepSpeed) equals the single-process gradient of the
            global batch. With ``gather=False`` each rank computes its local loss, unscaled.

    Forward: ``loss(q, t, negative_mask=None, target_keys=None, return_stats=False)`` with ``q`` (Bq, D) and ``t``
    (Bq * (1 + k), D), rows of ``t`` grouped per query as ``[pos_i, neg_i1, ..., neg_ik]``. The optional
    ``negative_mask`` (Bq, k) bool (the collator's) marks real negatives; False slots are dropped from
    every query's candidates (under gathering every rank must pass one or none). ``target_keys`` (Bt,) int64
    (the collator's content ids of ``t``) mark identical targets for ``mask_same_targets``. The embeddings are
    expected L2-normalized already (the model normalizes); scores are plain dot products, computed in
    float32. Every rank must have the same ``k``; the number of queries per rank may differ.

    Returns the scalar to call ``backward`` on: ``world_size * L`` when gathering over W ranks, else
    ``L``, where ``L`` is the mean loss over the global batch. With ``return_stats=True`` also a dict:
    ``loss`` (``L``, detached), ``accuracy`` (share of queries whose positive is top-1), ``scale``
    (1/tau), ``grad_scale`` (the factor applied), ``masked`` (negatives masked by the margin), ``same_targets``
    (candidates masked as copies of the positive), and the
    global ``num_queries`` / ``num_targets`` / ``padded_targets``; with ``matryoshka_dims``, ``loss`` is the weighted
    sum, ``accuracy`` and ``masked`` are the widest dim's and ``matryoshka_losses`` is ``{dim: InfoNCE at dim}``.
    """

    # config-arg sets the registry contract test (tests/test_registry_contract.py) runs
    example_args = [
        {},
        {"temperature": 0.05, "learnable_temperature": True, "symmetric": True, "false_negative_margin": 0.1},
        {"in_batch_negatives": False, "temperature": 0.1},
        {"matryoshka_dims": [16, 8, 4], "matryoshka_weights": [1.0, 0.5, 0.25], "symmetric": True},
    ]

    def __init__(
        self,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        max_scale: float = 100.0,
        in_batch_negatives: bool = True,
        symmetric: bool = False,
        false_negative_margin: float | None = None,
        gather: bool = True,
        mask_same_targets: bool = True,
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        args = dict(temperature=temperature, learnable_temperature=learnable_temperature, max_scale=max_scale)
        args.update(symmetric=symmetric, in_batch_negatives=in_batch_negatives)
        args.update(matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights)
        self.check_config({**args, "false_negative_margin": false_negative_margin})
        self.matryoshka_dims, self.matryoshka_weights = _matryoshka(matryoshka_dims, matryoshka_weights)
        self._warned_width: int | None = None
        self.temperature = float(temperature)
        self.learnable_temperature = bool(learnable_temperature)
        self.max_scale = float(max_scale)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.symmetric = bool(symmetric)
        self.false_negative_margin = None if false_negative_margin is None else float(false_negative_margin)
        self.gather = bool(gather)
        self.mask_same_targets = bool(mask_same_targets)
        if self.learnable_temperature:
            # shape (1,), not 0-dim: DeepSpeed 0.19.8's initial model broadcast cannot view a 0-dim parameter
            self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / self.temperature)]))
        else:
            self.register_parameter("log_scale", None)

    @staticmethod
    def check_config(args: dict[str, Any]) -> None:
        """Refuse impossible settings before anything is built (``mmembed validate`` runs this)."""
        t, max_scale = args.get("temperature", 0.02), args.get("max_scale", 100.0)
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0):
            raise ConfigError("temperature", f"must be a number > 0 (VLM2Vec uses 0.02), got {t!r}")
        if not (isinstance(max_scale, (int, float)) and max_scale > 0):
            raise ConfigError("max_scale", f"must be a number > 0, got {max_scale!r}")
        if args.get("learnable_temperature") and 1.0 / t > max_scale:
            raise ConfigError("temperature", f"{t} gives scale {1 / t:g} > max_scale {max_scale}")
        if args.get("symmetric") and not args.get("in_batch_negatives", True):
            raise ConfigError("symmetric", "needs in_batch_negatives=True (no other queries to contrast with)")
        margin = args.get("false_negative_margin")
        if margin is not None and not margin >= 0:
            raise ConfigError("false_negative_margin", f"must be >= 0 or null, got {margin!r}")
        _check_matryoshka(args.get("matryoshka_dims"), args.get("matryoshka_weights"))

    @property
    def scale(self) -> float:
        """Current logit scale 1/tau (clamped for a learnable temperature)."""
        if self.log_scale is None:
            return 1.0 / self.temperature
        return float(self.log_scale.detach().exp().clamp(max=self.max_scale))

    def _scale_tensor(self, world: int) -> torch.Tensor | float:
        if self.log_scale is None:
            return 1.0 / self.temperature
        log_scale = self.log_scale
        if world > 1:
            # Every rank computes the same global loss, so the temperature's gradient is already the
            # full gradient on each rank: undo the x world size that the averaging needs for the encoder.
            log_scale = _scale_grad(log_scale, 1.0 / world)
        return log_scale.float().exp().clamp(max=self.max_scale).squeeze(0)  # 0-dim

    def forward(
        self,
        q: torch.Tensor,
        t: torch.Tensor,
        *,
        negative_mask: torch.Tensor | None = None,
        target_keys: torch.Tensor | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Loss for queries ``q`` (Bq, D) and grouped targets ``t`` (Bq * (1 + k), D); see the class doc.

        ``negative_mask`` (Bq, k) bool marks the real hard negatives of this rank's queries; a False slot
        (padding, e.g. a copy of the positive from the collator) is removed from every query's candidates.
        """
        if q.ndim != 2 or t.ndim != 2 or q.shape[1] != t.shape[1]:
            raise ValueError(f"loss expects q (Bq, D) and t (Bt, D), got {tuple(q.shape)} and {tuple(t.shape)}")
        if q.shape[0] == 0 or t.shape[0] % q.shape[0]:
            raise ValueError(f"loss needs Bt = Bq * (1 + k) with Bq > 0, got Bq={q.shape[0]}, Bt={t.shape[0]}")
        group = t.shape[0] // q.shape[0]
        valid = None
        if negative_mask is not None:
            if negative_mask.shape != (q.shape[0], group - 1):
                raise ValueError(f"loss negative_mask must be (Bq, k) = {(q.shape[0], group - 1)}")
            pos_col = torch.ones(q.shape[0], 1, dtype=torch.bool, device=negative_mask.device)
            valid = torch.cat([pos_col, negative_mask.bool()], dim=1).reshape(-1)  # (Bt,), positives always valid
        world = get_world_size() if self.gather else 1
        if world > 1:
            q = all_gather_with_local_grad(q)
            t = all_gather_with_local_grad(t)
            if t.shape[0] != q.shape[0] * group:
                raise ValueError("loss: every rank must send the same number of targets per query")
            if valid is not None:  # gathered as uint8 (gloo has no bool collectives); every rank must pass one
                valid = all_gather_with_local_grad(valid.to(torch.uint8)).bool()
        keys = None
        if self.mask_same_targets and target_keys is not None:
            if target_keys.shape != (t.shape[0] // world if world > 1 else t.shape[0],):
                raise ValueError(
                    f"loss target_keys must be (Bt,) = ({t.shape[0] // world},), got {tuple(target_keys.shape)}"
                )
            keys = all_gather_with_local_grad(target_keys.long()) if world > 1 else target_keys.long()
        n = q.shape[0]
        q32, t32 = q.float(), t.float()  # (N, D), (N * group, D)
        scale = self._scale_tensor(world)
        labels, exclude, exclude_t, n_same = self._masks(n, group, valid, keys, q.device)
        per_dim: dict[int, torch.Tensor] = {}
        if self.matryoshka_dims is None:
            loss, correct, masked = self._terms(q32, t32, n, group, labels, exclude, exclude_t, scale)
        else:  # sum_d w_d * InfoNCE(first d dims, re-normalized): the gathered rows are cut, so GradCache stays exact
            self._check_width(q.shape[1])
            loss = q32.new_zeros(())
            for dim, weight in zip(self.matryoshka_dims, self.matryoshka_weights):
                qd, td = _shrink(q32, dim), _shrink(t32, dim)
                loss_d, correct_d, masked_d = self._terms(qd, td, n, group, labels, exclude, exclude_t, scale)
                loss = loss + weight * loss_d
                if not per_dim:  # accuracy and margin masking of the widest dimension
                    correct, masked = correct_d, masked_d
                per_dim[dim] = loss_d.detach()
        scaled = loss * world if world > 1 else loss
        if not return_stats:
            return scaled
        stats = {
            "loss": loss.detach(),
            "accuracy": correct.float() / n,
            "scale": float(scale.detach()) if isinstance(scale, torch.Tensor) else scale,
            "grad_scale": world,
            "masked": masked,
            "same_targets": n_same,
            "num_queries": n,
            "num_targets": n * group,
            "padded_targets": 0 if valid is None else int((~valid).sum().item()),
        }
        if per_dim:
            stats["matryoshka_losses"] = per_dim
        return scaled, stats

    def _masks(
        self, n: int, group: int, valid: torch.Tensor | None, keys: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        """Labels (N,), the candidates removed from the main term (broadcastable to its scores) and from the
        symmetric term, and how many candidates are copies of a query's positive. They do not depend on D."""
        exclude, exclude_t, n_same, pos_keys = None, None, 0, None
        if keys is not None:
            keys = keys.to(device)
            pos_keys = keys.view(n, group)[:, 0]  # (N,)
        if self.in_batch_negatives:
            labels = torch.arange(n, device=device) * group
            if valid is not None:
                exclude = ~valid.to(device)[None, :]  # (1, N * group)
            if keys is not None:  # a copy of query i's positive elsewhere in the batch is not a negative of i
                same = pos_keys[:, None] == keys[None, :]  # (N, N * group)
                same[torch.arange(n, device=device), labels] = False
                n_same = int(same.sum())
                exclude = same if exclude is None else exclude | same
        else:
            labels = torch.zeros(n, dtype=torch.long, device=device)
            if valid is not None:
                exclude = ~valid.to(device).view(n, group)  # (N, group)
            if keys is not None:
                same = keys.view(n, group) == pos_keys[:, None]
                same[:, 0] = False
                n_same = int(same.sum())
                exclude = same if exclude is None else exclude | same
        if self.symmetric and pos_keys is not None:  # query j whose positive equals positive i is not its negative
            exclude_t = pos_keys[:, None] == pos_keys[None, :]
            exclude_t.fill_diagonal_(False)
        return labels, exclude, exclude_t, n_same

    def _terms(
        self,
        q32: torch.Tensor,
        t32: torch.Tensor,
        n: int,
        group: int,
        labels: torch.Tensor,
        exclude: torch.Tensor | None,
        exclude_t: torch.Tensor | None,
        scale: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """InfoNCE of ``q32`` (N, d) against ``t32`` (N * group, d): (mean loss, correct top-1, margin-masked)."""
        if self.in_batch_negatives:
            scores = q32 @ t32.T  # (N, N * group)
        else:
            scores = torch.einsum("nd,ngd->ng", q32, t32.view(n, group, -1))  # (N, group)
        loss, correct, masked = _masked_cross_entropy(scores, labels, scale, self.false_negative_margin, exclude)
        if self.symmetric:
            pos = t32.view(n, group, -1)[:, 0]  # (N, d)
            scores_t = pos @ q32.T  # (N, N)
            loss_t, _, masked_t = _masked_cross_entropy(
                scores_t, torch.arange(n, device=q32.device), scale, self.false_negative_margin, exclude_t
            )
            loss = 0.5 * (loss + loss_t)
            masked += masked_t
        return loss, correct, masked

    def _check_width(self, width: int) -> None:
        """Every Matryoshka dim fits the embeddings (known only now when the model has no ``embed_dim``)."""
        dims = self.matryoshka_dims or ()
        if dims and dims[0] > width:
            raise ConfigError("loss.matryoshka_dims", f"{dims[0]} exceeds the embedding dimension {width}")
        if dims and width not in dims and width != self._warned_width:
            self._warned_width = width
            log.warning(
                "loss.matryoshka_dims %s leave out the full dimension %d: it is not trained as such (as in "
                "sentence-transformers' MatryoshkaLoss); add %d to train the untruncated embedding too",
                list(dims),
                width,
                width,
            )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, learnable_temperature={self.learnable_temperature}, "
            f"in_batch_negatives={self.in_batch_negatives}, symmetric={self.symmetric}, "
            f"false_negative_margin={self.false_negative_margin}, gather={self.gather}, "
            f"mask_same_targets={self.mask_same_targets}"
            + (f", matryoshka_dims={list(self.matryoshka_dims)}" if self.matryoshka_dims else "")
        )

"""Tie-aware ranking metrics for one query: hit@k, recall@k, MRR, NDCG@k (linear gain).

A model that gives several candidates the same score has not ranked them. Instead of breaking ties by
position (VLM2Vec's ``argmax == 0`` credits a constant model with a hit on every query, because the
positive sits at index 0), every metric here is the **expected value over a uniformly random order
of the tied candidates** (McSherry & Najork, "Computing information retrieval performance measures
efficiently in the presence of tied scores", ECIR 2008). Consequences:

- a constant model scores exactly the chance level: hit@1 = 1/M for M candidates, MRR = H_M / M;
- with no ties the values equal the usual ones (MMEB's Precision@1, VLM2Vec ``RankingMetrics``).

Scores closer than ``tie_tol`` count as tied, so float noise from batching (a different batch size
or number of ranks) cannot turn a tie into a win.

Definitions for one query with candidate scores ``s`` (M,) and relevance gains ``g`` (M,) (1 for the
MMEB positive, 0 otherwise; graded gains allowed). Candidates are sorted into groups of equal score,
best first; a group occupies ranks ``a+1 .. a+m``:

- hit@k: probability that at least one relevant candidate is in the top k.
- recall@k: expected number of relevant candidates in the top k / number of relevant candidates.
- MRR: expected ``1 / rank`` of the first relevant candidate (0 when there is none).
- NDCG@k (linear gain, VLM2Vec ``ndcg_linear``): DCG with each rank of a tied group receiving the
  group's mean gain, ``sum_{rank<=k} gain / log2(rank + 1)``, divided by the ideal DCG@k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["tie_groups", "hit_at_k", "recall_at_k", "mrr", "ndcg_at_k", "ranking_metrics", "TIE_TOL"]

TIE_TOL = 1e-6


def tie_groups(scores: np.ndarray, tol: float = TIE_TOL) -> list[np.ndarray]:
    """Candidate indices grouped by (tolerance-)equal score, best group first.

    Args:
        scores: (M,) similarity of each candidate to the query.
        tol: scores within ``tol`` of the previous candidate in descending order join its group.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return []
    order = np.argsort(-s, kind="stable")
    cuts = np.nonzero(np.diff(-s[order]) > tol)[0] + 1
    return list(np.split(order, cuts))


def _relevance(scores: np.ndarray, relevant: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """Positive index or indices -> (M,) gains; an (M,) float array is taken as the gains."""
    n = len(scores)
    rel = np.asarray(relevant)
    if rel.ndim == 1 and rel.shape[0] == n and rel.dtype.kind == "f":
        return rel.astype(np.float64)
    gains = np.zeros(n, dtype=np.float64)
    idx = np.atleast_1d(rel).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"relevant index {idx.tolist()} out of range for {n} candidates")
    gains[idx] = 1.0
    return gains


def hit_at_k(scores: np.ndarray, relevant: int | Sequence[int] = 0, k: int = 1, tol: float = TIE_TOL) -> float:
    """P(at least one relevant candidate ranks in the top ``k``) under random tie order."""
    gains = _relevance(scores, relevant) > 0
    start = 0
    for g in tie_groups(scores, tol):
        m, r = len(g), int(gains[g].sum())
        slots = min(m, k - start)
        if slots <= 0:
            return 0.0
        if r:
            if slots == m:
                return 1.0
            return 1.0 - math.comb(m - r, slots) / math.comb(m, slots)  # hypergeometric: none of r drawn
        start += m
    return 0.0


def recall_at_k(scores: np.ndarray, relevant: int | Sequence[int] = 0, k: int = 1, tol: float = TIE_TOL) -> float:
    """Expected fraction of the relevant candidates found in the top ``k`` (0 when none is relevant)."""
    gains = _relevance(scores, relevant) > 0
    total = int(gains.sum())
    if total == 0:
        return 0.0
    found, start = 0.0, 0
    for g in tie_groups(scores, tol):
        slots = min(len(g), k - start)
        if slots <= 0:
            break
        found += slots * gains[g].sum() / len(g)
        start += len(g)
    return float(found / total)


def mrr(scores: np.ndarray, relevant: int | Sequence[int] = 0, tol: float = TIE_TOL) -> float:
    """Expected reciprocal rank of the first relevant candidate under random tie order."""
    gains = _relevance(scores, relevant) > 0
    start = 0
    for g in tie_groups(scores, tol):
        m, r = len(g), int(gains[g].sum())
        if r:
            # P(first relevant at offset j of the group) = C(m - j - 1, r - 1) / C(m, r)
            total = math.comb(m, r)
            return float(sum(math.comb(m - j - 1, r - 1) / total / (start + j + 1) for j in range(m - r + 1)))
        start += m
    return 0.0


def ndcg_at_k(
    scores: np.ndarray, relevant: int | Sequence[int] | np.ndarray = 0, k: int = 10, tol: float = TIE_TOL
) -> float:
    """Tie-aware NDCG@k with linear gain; ``relevant`` is index(es) or an (M,) float array of gains."""
    gains = _relevance(scores, relevant)
    ideal = np.sort(gains)[::-1][:k]
    idcg = float((ideal / np.log2(np.arange(2, ideal.size + 2))).sum())
    if idcg == 0.0:
        return 0.0
    dcg, start = 0.0, 0
    for g in tie_groups(scores, tol):
        slots = min(len(g), k - start)
        if slots <= 0:
            break
        ranks = np.arange(start + 1, start + slots + 1)
        dcg += float(gains[g].mean() * (1.0 / np.log2(ranks + 1)).sum())
        start += len(g)
    return dcg / idcg


def ranking_metrics(
    scores: np.ndarray,
    relevant: int | Sequence[int] | np.ndarray = 0,
    ks: Sequence[int] = (1, 5, 10),
    tol: float = TIE_TOL,
) -> dict[str, float]:
    """All metrics of one query: ``hit@k``, ``recall@k``, ``ndcg@k`` for each k, and ``mrr``."""
    idx = _as_index(relevant)
    out = {f"hit@{k}": hit_at_k(scores, idx, k, tol) for k in ks}
    out.update({f"recall@{k}": recall_at_k(scores, idx, k, tol) for k in ks})
    out["mrr"] = mrr(scores, idx, tol)
    out.update({f"ndcg@{k}": ndcg_at_k(scores, relevant, k, tol) for k in ks})
    return out


def _as_index(relevant: int | Sequence[int] | np.ndarray) -> int | Sequence[int]:
    rel = np.asarray(relevant)
    if rel.ndim == 1 and rel.dtype.kind == "f":
        return np.nonzero(rel > 0)[0].tolist()
    return relevant  # type: ignore[return-value]

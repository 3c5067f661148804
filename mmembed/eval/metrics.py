"""Ranking metrics for one query, in two definitions: tie-aware (mmembed's headline) and MMEB-official.

**Tie-aware** hit@k, recall@k, MRR, NDCG@k (linear gain) are mmembed's own numbers; **official** ones
(:func:`official_metrics`, keys ``official_*``) reproduce VLM2Vec's and are the numbers comparable with
published MMEB tables. Both are computed for every query; :data:`SCORE_DEFINITIONS` names them in
``scores.json``.

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

The **official** definition (:func:`official_metrics`) is VLM2Vec's: candidates are sorted by descending
score and equal scores keep their list order, so the positive (index 0 in MMEB) wins every tie. This is
V1 ``evaluation/eval_utils.py::get_pred`` (``np.argmax``: the first maximum) and V2 ``eval.py`` (``np.argsort(-score)``
over ``cand_names``) with ``src/eval_utils/metrics.py::RankingMetrics`` (TIGER-AI-Lab/VLM2Vec): hit@k = a relevant
candidate in the top k; recall@k = relevant found in the top k / relevant (1.0 when none is relevant, as
there); MRR@k = ``1 / rank`` of the first relevant within the top k, else 0; NDCG@k = ``ndcg_linear``: DCG of the
gains at ranks 1..k over the DCG of the k largest gains. MMEB reports hit@1 (image, video) and NDCG@5 (visdoc).
Two deliberate differences: relevance is by candidate index (VLM2Vec matches candidate *names*, so a same-named
duplicate of the positive also counts, and its NDCG can exceed 1: seen only when the positive has a duplicate), and
ties are broken stably (V2's default ``np.argsort`` is not guaranteed stable beyond 16 elements, V1's ``argmax``
is: seen only when more than 16 candidates tie). Official scores compare floats exactly, without ``TIE_TOL``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "tie_groups",
    "hit_at_k",
    "recall_at_k",
    "mrr",
    "ndcg_at_k",
    "ranking_metrics",
    "stable_ranks",
    "tied_reciprocal_rank",
    "official_metrics",
    "official_headline",
    "TIE_TOL",
    "OFFICIAL_KS",
    "SCORE_DEFINITIONS",
]

#: scores closer than this count as tied (tie-aware metrics only)
TIE_TOL = 1e-6
#: cut-offs of the official metrics, always computed: VLM2Vec's ``RankingMetrics`` default ``k_list``
OFFICIAL_KS = (1, 5, 10)

#: what ``scores.json`` says about its keys (``score_definitions``); bump ``version`` when a definition changes
SCORE_DEFINITIONS: dict[str, object] = {
    "version": "mmembed-scores/2",
    "tie_aware": {
        "keys": ["hit@1", "hit@k", "recall@k", "mrr", "ndcg@k"],
        "definition": "expected value over a uniformly random order of tied candidates (scores within "
        f"{TIE_TOL:g} are tied; McSherry & Najork, ECIR 2008); MRR without cut-off; NDCG linear gain; "
        "a constant model scores the chance level",
        "headline": "hit@1 (mmembed's headline: overall, meta_tasks, splits)",
    },
    "official": {
        "keys": [
            "official",
            "official_metric",
            "official_hit@k",
            "official_recall@k",
            "official_mrr@k",
            "official_ndcg@k",
        ],
        "definition": "VLM2Vec MMEB: candidates sorted by descending score, equal scores in list order (the positive, "
        "listed first, wins ties); hit@k, recall@k, MRR@k (1/rank of the first relevant within the top k, else 0), "
        "NDCG@k (ndcg_linear); exact float comparison",
        "source": "TIGER-AI-Lab/VLM2Vec eval.py, evaluation/eval_utils.py (get_pred), src/eval_utils/metrics.py",
        "headline": "official = official_hit@1, or official_ndcg@5 for a task whose metric is NDCG (visdoc); "
        "official_overall and meta_tasks/splits[...]['official'] are its means",
        "comparable_with": "published MMEB tables (VLM2Vec, MMEB leaderboard)",
    },
}


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
            return tied_reciprocal_rank(start, m, r)
        start += m
    return 0.0


def tied_reciprocal_rank(start: int, m: int, r: int) -> float:
    """Expected ``1 / rank`` of the first relevant of ``r`` relevant candidates in a tie group of ``m`` after ``start``.

    P(first relevant at offset j of the group) = C(m - j - 1, r - 1) / C(m, r). Shared by :func:`mrr` and the
    vectorized path (:mod:`mmembed.eval.batch_metrics`), so that both give the same float.
    """
    total = math.comb(m, r)
    return float(sum(math.comb(m - j - 1, r - 1) / total / (start + j + 1) for j in range(m - r + 1)))


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


def stable_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every candidate in descending score order, equal scores in list order (VLM2Vec's order).

    Args:
        scores: (..., M) scores; the last axis holds one query's candidates. NaN ranks last.

    Returns:
        (..., M) int64 ranks: ``ranks[..., j]`` is where candidate ``j`` lands (1 = first).
    """
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, axis=-1, kind="stable")  # stable: the earlier index wins a tie
    ranks = np.empty(s.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, np.arange(1, s.shape[-1] + 1, dtype=np.int64), axis=-1)
    return ranks


def official_metrics(
    scores: np.ndarray, relevant: int | Sequence[int] | np.ndarray = 0, ks: Sequence[int] = OFFICIAL_KS
) -> dict[str, float]:
    """MMEB-official metrics of one query (module doc): ``official_{hit,recall,mrr,ndcg}@k`` for each k.

    Args:
        scores: (M,) similarity of each candidate to the query.
        relevant: positive index or indices (MMEB: 0), or an (M,) float array of graded gains (visdoc ``rel_scores``).
        ks: cut-offs.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    gains = _relevance(s, relevant)
    ranks = stable_ranks(s)
    rel_ranks = ranks[gains > 0]
    first = int(rel_ranks.min()) if rel_ranks.size else s.size + 1
    disc = 1.0 / np.log2(ranks + 1.0)
    ideal = np.sort(gains)[::-1]
    out: dict[str, float] = {}
    for k in ks:
        idcg = float((ideal[:k] / np.log2(np.arange(2, min(k, ideal.size) + 2))).sum())
        dcg = float((gains * disc)[ranks <= k].sum())
        out[f"official_hit@{k}"] = float(first <= k)
        out[f"official_recall@{k}"] = float((rel_ranks <= k).mean()) if rel_ranks.size else 1.0
        out[f"official_mrr@{k}"] = 1.0 / first if first <= k else 0.0
        out[f"official_ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
    return out


def official_headline(metric: str | None = None) -> str:
    """The official key reported as a dataset's ``official`` score, from the task's metric name.

    ``None``/``hit@1`` -> ``official_hit@1`` (MMEB image and video tasks); any NDCG name without a cut-off
    (``ndcg``, ``ndcg_linear``) -> ``official_ndcg@5`` (MMEB-V2 visdoc); ``ndcg@10``, ``mrr@10``, ``hit@5``,
    ``recall@5`` -> that official key; bare ``mrr`` -> ``official_mrr@10``.
    """
    if not metric:
        return "official_hit@1"
    name, _, k = str(metric).lower().removeprefix("official_").partition("@")
    kind = "ndcg" if name.startswith("ndcg") else name
    if kind not in ("hit", "recall", "mrr", "ndcg"):
        raise ValueError(f"task metric {metric!r}: expected hit@K, recall@K, mrr@K or ndcg@K")
    if not k:
        k = {"ndcg": "5", "mrr": "10"}.get(kind, "1")
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"task metric {metric!r}: the cut-off after '@' must be a positive integer")
    return f"official_{kind}@{int(k)}"

"""The ranking metrics of many queries at once, each with one positive: the same floats as the per-query functions.

Input: a block of ``n`` queries with ``M`` candidates each, ``scores`` (n, M) float64 and ``positive`` (n,) (the
positive's position in each row). One stable sort of the block gives, per row:

- ``rank0``: where the positive lands in VLM2Vec's order (descending, ties in list order), 0-based;
- ``a``, ``m``: the candidates in tie groups strictly above the positive's group, and that group's size (groups as
  :func:`mmembed.eval.metrics.tie_groups` forms them: consecutive scores within ``tol``).

With a single relevant candidate every tie-aware metric is a function of ``(a, m)`` alone, and for hit@k,
recall@k and NDCG@k of ``(min(a, K), m)`` (K = the largest cut-off: a positive below the top K scores 0 there).
Those are computed once per distinct pair by the per-query reference (:func:`ranking_metrics` on a stand-in
ranking with the same ``a`` and ``m``), so the values are the reference's floats by construction; MRR is
``1 / (a + 1)`` when the positive is not tied (the reference's one-term sum) and the shared
:func:`tied_reciprocal_rank` per distinct ``(a, m)`` otherwise. The official metrics are functions of ``rank0``:
``1 / rank``, and the discount ``1 / log2(rank + 1)`` taken from a table computed as the reference computes it.
No Python runs per query or per pair, only per distinct ``(a, m)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmembed.eval.metrics import TIE_TOL, official_metrics, ranking_metrics, tied_reciprocal_rank

__all__ = ["metric_names", "positive_ranks", "tie_aware_block", "official_block", "margins_block", "score_block"]


def metric_names(ks: Sequence[int], oks: Sequence[int]) -> list[str]:
    """The keys of ``ranking_metrics(.., ks)`` then ``official_metrics(.., oks)``, in their order."""
    return [*ranking_metrics(np.zeros(1), 0, ks), *official_metrics(np.zeros(1), 0, oks)]


def positive_ranks(
    scores: np.ndarray, positive: np.ndarray, tol: float = TIE_TOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rank0, a, m)`` of each row's positive (module doc), each (n,) int64.

    Args:
        scores: (n, M) float64 candidate scores of n queries.
        positive: (n,) position of each row's positive among its M candidates.
        tol: scores within ``tol`` of the previous one in descending order share its tie group.
    """
    n, width = scores.shape
    rows = np.arange(n)
    positive = np.asarray(positive)
    # fast path: a positive with no other score within tol, none equal and no NaN is a tie group of its own, and
    # the candidates above it are those scoring higher (|s_j - s_p| is the gap the sort compares with tol)
    own = scores[rows, positive][:, None]
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, not apart (the sorted path decides)
        apart = (np.abs(scores - own) > tol) & (scores != own)
    apart[rows, positive] = True
    alone = apart.all(axis=1)
    rank0 = (scores > own).sum(axis=1).astype(np.int64)
    a, m = rank0.copy(), np.ones(n, dtype=np.int64)
    if not alone.all():
        tied = np.flatnonzero(~alone)
        rank0[tied], a[tied], m[tied] = _sorted_ranks(scores[tied], positive[tied], tol)
    return rank0, a, m


def _sorted_ranks(scores: np.ndarray, positive: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`positive_ranks` by a stable sort of each row, grouping as :func:`mmembed.eval.metrics.tie_groups`."""
    n, width = scores.shape
    rows = np.arange(n)
    neg = -scores
    order = np.argsort(neg, axis=1, kind="stable")
    ordered = np.take_along_axis(neg, order, axis=1)
    group = np.zeros((n, width), dtype=np.int64)
    if width > 1:
        np.cumsum(np.diff(ordered, axis=1) > tol, axis=1, out=group[:, 1:])
    rank0 = np.argmax(order == positive[:, None], axis=1)
    g = group[rows, rank0][:, None]
    a = (group < g).sum(axis=1)
    m = (group == g).sum(axis=1)
    return rank0.astype(np.int64), a.astype(np.int64), m.astype(np.int64)


def tie_aware_block(a: np.ndarray, m: np.ndarray, ks: Sequence[int], tol: float = TIE_TOL) -> dict[str, np.ndarray]:
    """Tie-aware ``hit@k``, ``recall@k``, ``mrr``, ``ndcg@k`` (the keys of :func:`ranking_metrics`) per row, each (n,).

    Args:
        a: (n,) candidates ranked in tie groups above the positive's group.
        m: (n,) size of the positive's tie group (>= 1).
    """
    a, m = np.asarray(a, dtype=np.int64), np.asarray(m, dtype=np.int64)
    cap = max(max(ks, default=1), 0)
    base = int(m.max(initial=1)) + 1
    uniq, inv = np.unique(np.minimum(a, cap) * base + m, return_inverse=True)
    inv = inv.reshape(-1)
    names = list(ranking_metrics(np.zeros(1), 0, ks, tol))
    hi = 1.0 + 2.0 * (abs(tol) + 1.0)  # above the tied group by more than tol: a group of its own
    table = np.empty((uniq.size, len(names)))
    for u, c in enumerate(uniq.tolist()):
        aa, mm = divmod(c, base)
        stand_in = np.concatenate([np.full(aa, hi), np.ones(mm)])
        ref = ranking_metrics(stand_in, aa, ks, tol)
        table[u] = [ref[k] for k in names]
    out = {k: table[inv, j] for j, k in enumerate(names)}
    rr = np.empty(a.size)
    alone = m == 1
    rr[alone] = 1.0 / (a[alone] + 1.0)
    if not alone.all():
        tied = ~alone
        code = a[tied] * base + m[tied]
        uniq, inv = np.unique(code, return_inverse=True)
        vals = np.array([tied_reciprocal_rank(c // base, c % base, 1) for c in uniq.tolist()])
        rr[tied] = vals[inv.reshape(-1)]
    out["mrr"] = rr
    return out


def official_block(rank0: np.ndarray, width: int, oks: Sequence[int]) -> dict[str, np.ndarray]:
    """MMEB-official ``official_{hit,recall,mrr,ndcg}@k`` per row (the keys of :func:`official_metrics`), each (n,).

    Args:
        rank0: (n,) 0-based rank of the positive in VLM2Vec's order (descending score, ties in list order).
        width: M, the number of candidates of each row.
    """
    first = np.asarray(rank0, dtype=np.int64) + 1
    disc = 1.0 / np.log2(np.arange(1, width + 1, dtype=np.int64) + 1.0)  # as official_metrics: 1 / log2(rank + 1)
    out: dict[str, np.ndarray] = {}
    for k in oks:
        ideal = np.zeros(min(k, width))
        ideal[:1] = 1.0
        idcg = float((ideal / np.log2(np.arange(2, min(k, width) + 2))).sum())
        inside = first <= k
        out[f"official_hit@{k}"] = inside.astype(np.float64)
        out[f"official_recall@{k}"] = inside.astype(np.float64)
        out[f"official_mrr@{k}"] = np.where(inside, 1.0 / first, 0.0)
        out[f"official_ndcg@{k}"] = np.where(inside, disc[first - 1] / idcg, 0.0) if idcg > 0 else np.zeros(first.size)
    return out


def margins_block(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(margin, best negative)`` per row as :func:`mmembed.eval.examples.margin_of`: (n,) float64, (n,) int64.

    The margin is ``score(positive) - max score(negatives)``; ``(inf, -1)`` for rows with a single candidate.
    """
    n, width = scores.shape
    if width < 2:
        return np.full(n, np.inf), np.full(n, -1, dtype=np.int64)
    rows = np.arange(n)
    neg = scores.copy()
    neg[rows, positive] = -np.inf
    best = np.argmax(neg, axis=1)
    return scores[rows, positive] - neg[rows, best], best.astype(np.int64)


def score_block(
    scores: np.ndarray, positive: np.ndarray, ks: Sequence[int], oks: Sequence[int], tol: float = TIE_TOL
) -> dict[str, np.ndarray]:
    """Every per-query metric of a block plus ``_margin`` and ``_best_negative``: ``{name: (n,)}``.

    Args:
        scores: (n, M) float64 candidate scores.
        positive: (n,) positive position per row.
        ks: tie-aware cut-offs (as :func:`ranking_metrics`); oks: official cut-offs (as :func:`official_metrics`).
    """
    rank0, a, m = positive_ranks(scores, positive, tol)
    out = tie_aware_block(a, m, ks, tol)
    out.update(official_block(rank0, scores.shape[1], oks))
    out["_margin"], out["_best_negative"] = margins_block(scores, positive)
    return out

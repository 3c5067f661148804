"""Scoring one eval set from its plan (:mod:`mmembed.eval.plan`) and the (U, D) embeddings of its distinct inputs.

Rows are split over ranks (:func:`mmembed.dist.shard_range`, contiguous shares); each rank scores its rows and the
per-query results (every metric, the margin and the best negative of each row: a few floats per query) are gathered
in row order with :func:`mmembed.dist.all_gather_rows`, so every rank ends with the same arrays and means.

Within a share, rows with the same number of candidates M are scored in blocks of at most :data:`BLOCK` pairs:
the block's candidate indices form an (n, M) int32 matrix into the embedding table, its scores an (n, M) float64
matrix, and the metrics are computed on the whole block (:func:`mmembed.eval.batch_metrics.score_block`).

The scores are the per-row float64 dot products of the earlier evaluator, bit for bit: for each query one BLAS
matrix-vector product of its own (M, D) candidate rows, in list order, with its query (``emb[ci] @ emb[qi]`` in
float64). A batched matrix product (float64 GEMM, or float32 on a device) rounds differently in the last bits
(measured: about 3 of 4 scores differ at D = 64), and the official metrics compare scores exactly, so a last-bit
change can move a tie; the product stays float64 on the CPU, one call per query, none per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmembed import dist
from mmembed.eval.batch_metrics import metric_names, positive_ranks, score_block, tie_aware_block
from mmembed.eval.examples import Confusion, example_view, select_rows
from mmembed.eval.metrics import OFFICIAL_KS, TIE_TOL
from mmembed.eval.plan import Plan

__all__ = ["score_plan", "score_rows", "official_ks", "BLOCK"]

#: at most this many query x candidate pairs are scored at once (bounds the (n, M) score and sort arrays)
BLOCK = 1 << 20
_MARGIN, _BEST = "_margin", "_best_negative"


def official_ks(ks: Sequence[int], official: str) -> list[int]:
    """Official cut-offs: ``ks``, VLM2Vec's 1, 5, 10 and the headline's own."""
    return sorted({*ks, *OFFICIAL_KS, int(official.rsplit("@", 1)[1])})


def _scores(emb64: np.ndarray, queries: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """(n, M) float64: row r is ``emb64[cands[r]] @ emb64[queries[r]]`` (one GEMV per query, as the reference)."""
    out = np.empty(cands.shape, dtype=np.float64)
    for r in range(cands.shape[0]):
        out[r] = emb64[cands[r]] @ emb64[queries[r]]
    return out


def score_rows(
    plan: Plan, emb64: np.ndarray, start: int, stop: int, ks: Sequence[int], oks: Sequence[int], tol: float = TIE_TOL
) -> dict[str, np.ndarray]:
    """Per-row metrics of rows ``[start, stop)``: ``{name: (stop - start,)}`` plus ``_margin``, ``_best_negative``.

    Rows with a missing image score 0 on every metric (margin NaN, best negative -1).

    Args:
        emb64: (U, D) float64 embeddings of ``plan.sides``.
    """
    n = stop - start
    out = {k: np.zeros(n) for k in metric_names(ks, oks)}
    out[_MARGIN], out[_BEST] = np.full(n, np.nan), np.full(n, -1, dtype=np.int64)
    rows = np.arange(start, stop)
    rows = rows[~plan.missing_rows[start:stop]]
    sizes = plan.sizes[rows]
    for width in np.unique(sizes).tolist():
        same = rows[sizes == width]
        step = max(1, BLOCK // width)
        for b in range(0, same.size, step):
            block = same[b : b + step]
            cands = plan.cand_flat[plan.cand_offsets[block][:, None] + np.arange(width)]
            scores = _scores(emb64, plan.query_idx[block], cands)
            got = score_block(scores, plan.positive[block], ks, oks, tol)
            for k, v in got.items():
                out[k][block - start] = v
    return out


def score_plan(
    plan: Plan,
    emb: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5, 10),
    corpus: bool = False,
    n_examples: int = 0,
    confusion: bool = False,
    tol: float = TIE_TOL,
    official: str = "official_hit@1",
) -> dict[str, Any]:
    """Metrics of one dataset from the embeddings of its unique inputs (collective under a process group).

    Args:
        plan: from :func:`mmembed.eval.plan.plan_dataset`.
        emb: (U, D) embeddings of ``plan.sides`` (dot product = similarity, as ``np.dot`` in VLM2Vec).
        ks: cut-offs for hit@k, recall@k and ndcg@k.
        corpus: also rank every query against all distinct candidates of the dataset.
        n_examples: keep the top-5 ranking of ``n_examples`` rows for ``examples.html``: the worst misses and
            the near-ties (:func:`mmembed.eval.examples.select_rows`, by the positive's margin over the best
            negative), then rows not scored because of a missing image.
        confusion: count true -> predicted label over the misses (``"confusion"``: the 10 most frequent).
        official: the official key reported as ``"official"`` (:func:`mmembed.eval.metrics.official_headline`).

    Returns:
        ``{"hit@1", "n", "missing_images", "chance", "num_candidates", "hit@k", "recall@k", "mrr",
        "ndcg@k", "official_{hit,recall,mrr,ndcg}@k", "official", "official_metric", "corpus"?: {...},
        "examples"?: [...], "confusion"?: [...], "misses"?: int}`` (official cut-offs: ``ks`` and 1, 5, 10).
    """
    keys = list(ks) if 1 in ks else [1, *ks]
    oks = official_ks(ks, official)
    emb64 = np.asarray(emb).astype(np.float64)
    per = dist.all_gather_rows(score_rows(plan, emb64, *dist.shard_range(plan.n_rows), keys, oks, tol))
    margins, best = per.pop(_MARGIN), per.pop(_BEST)
    sizes = plan.sizes
    out: dict[str, Any] = {
        "hit@1": float(np.mean(per["hit@1"])),
        "n": len(plan.examples),
        "missing_images": int(plan.missing_rows.sum()),
        "unreadable_images": 0 if plan.unreadable_rows is None else int(plan.unreadable_rows.sum()),
        "chance": float(np.mean(1.0 / sizes)),
        "num_candidates": float(np.mean(sizes)),
    }
    out.update({k: float(np.mean(v)) for k, v in per.items() if k != "hit@1"})
    out["official"], out["official_metric"] = out[official], official
    if corpus:
        out["corpus"] = _score_corpus(plan, emb64, keys, tol, official)
    if n_examples:
        out["examples"] = [_view(plan, emb64, int(r), tol, margins[r]) for r in select_rows(margins, n_examples)]
    if confusion:
        conf = Confusion(plan)
        missed = np.nonzero((per["hit@1"] == 0.0) & ~plan.missing_rows)[0]
        conf.add_rows(missed, best[missed])
        out["confusion"] = conf.top(10)
        out["misses"] = conf.misses
    return out


def _view(plan: Plan, emb64: np.ndarray, row: int, tol: float, margin: float) -> dict[str, Any]:
    """The example view of one selected row (its scores computed again: only the margins of all rows are kept)."""
    if plan.missing_rows[row]:
        return example_view(plan, row, None, {"hit@1": 0.0}, None)
    scores = emb64[plan.row_cands(row)] @ emb64[plan.query_idx[row]]
    _, a, m = positive_ranks(scores[None], plan.positive[row : row + 1], tol)
    hit1 = float(tie_aware_block(a, m, [1], tol)["hit@1"][0])  # = ranking_metrics(...)["hit@1"], without its sorts
    return example_view(plan, row, scores, {"hit@1": hit1}, margin)


def _score_corpus(plan: Plan, emb64: np.ndarray, ks: Sequence[int], tol: float, official: str) -> dict[str, Any]:
    """Every query against all distinct candidates; official ties break by first appearance in the candidate lists
    (the order of VLM2Vec's candidate dict in ``eval_type: global``)."""
    corpus = np.unique(plan.cand_flat)  # side indices number inputs in order of first appearance
    oks = official_ks(ks, official)
    c_emb = emb64[corpus]
    gone = plan.missing[corpus]
    pos = np.searchsorted(corpus, plan.positive_idx())
    start, stop = dist.shard_range(plan.n_rows)
    n = stop - start
    local = {k: np.zeros(n) for k in metric_names(ks, oks)}
    rows = np.arange(start, stop)
    rows = rows[~plan.missing_rows[start:stop]]
    step = max(1, BLOCK // max(1, corpus.size))
    for b in range(0, rows.size, step):
        block = rows[b : b + step]
        scores = np.empty((block.size, corpus.size))
        for r, qi in enumerate(plan.query_idx[block]):
            scores[r] = c_emb @ emb64[qi]
        scores[:, gone] = -np.inf
        got = score_block(scores, pos[block], ks, oks, tol)
        for k in local:
            local[k][block - start] = got[k]
    per = dist.all_gather_rows(local)
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in per.items()}
    out["official"], out["official_metric"] = out[official], official
    out["corpus_size"] = int(corpus.size)
    return out

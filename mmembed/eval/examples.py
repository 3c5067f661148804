"""Which rows ``examples.html`` shows, and what it shows of them.

The evaluator computes, for every scored row, the **margin** of the positive over the best negative
(``score(positive) - max score(negatives)``: below 0 a miss, near 0 a near-tie). :func:`select_rows` keeps the
``k`` rows that teach the most: the worst misses first (most negative margin), then the near-ties (smallest
``|margin|``), then rows not scored because of a missing image. Only the margins of all rows are kept (one float
each); the views are built for the selected rows alone.

For classification datasets :class:`Confusion` counts, over all misses, which label the model chose instead of
the true one (candidates as indices into the plan's unique inputs, so it holds one counter entry per pair).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from mmembed.eval.checks import missing_paths
from mmembed.eval.plan import Plan

__all__ = ["margin_of", "select_rows", "example_view", "Confusion", "TOP"]

TOP = 5  # candidates shown per example


def margin_of(scores: np.ndarray, positive: int) -> tuple[float, int]:
    """``(margin, best negative index)``; ``(inf, -1)`` when the row has no negative."""
    if scores.size < 2:
        return float("inf"), -1
    neg = scores.copy()
    neg[positive] = -np.inf
    j = int(np.argmax(neg))
    return float(scores[positive] - neg[j]), j


def select_rows(margins: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows to show: misses by most negative margin, then by smallest |margin|, then NaN rows.

    Args:
        margins: (N,) margin per row, NaN for a row that was not scored (missing image).
        k: how many to keep.
    """
    m = np.asarray(margins, dtype=np.float64)
    if k <= 0 or m.size == 0:
        return np.zeros(0, dtype=np.int64)
    nan = np.isnan(m)
    group = np.where(nan, 2, np.where(m < 0, 0, 1))
    key = np.where(nan, 0.0, np.where(m < 0, m, np.abs(m)))
    order = np.lexsort((np.arange(m.size), key, group))  # last key is the primary one
    return order[:k]


def _side_view(side: Any) -> dict[str, Any]:
    return {"instruction": side.instruction, "text": side.text, "images": [str(i) for i in side.images]}


def example_view(
    plan: Plan, row: int, scores: np.ndarray | None, m: dict[str, float], margin: float | None
) -> dict[str, Any]:
    """What the page shows of one row: the query, its top candidates (and the positive when not among them)."""
    ex = plan.examples[row]
    # a row with a missing image was not scored: show its first candidates in file order
    order = np.argsort(-scores, kind="stable")[:TOP] if scores is not None else range(min(TOP, len(ex.candidates)))
    rank = None if scores is None else int((scores > scores[ex.positive]).sum()) + 1

    def cand(j: int, r: int | None) -> dict[str, Any]:
        return {
            "index": int(j),
            "rank": r,
            "score": None if scores is None else float(scores[j]),
            "positive": int(j) == ex.positive,
            **_side_view(ex.candidates[j]),
        }

    top = [cand(j, i + 1 if scores is not None else None) for i, j in enumerate(order)]
    if all(not c["positive"] for c in top):
        top.append(cand(ex.positive, rank))
    return {
        "row": row,
        "source": ex.source,
        "query": _side_view(ex.query),
        "top": top,
        "hit@1": m["hit@1"],
        "margin": None if margin is None or not np.isfinite(margin) else float(margin),
        "positive_rank": rank,
        "missing_images": list(ex.meta.get("missing_images") or []),
        "missing_paths": missing_paths(ex) if ex.meta.get("missing_images") else [],
        "num_candidates": len(ex.candidates),
    }


def _label(side: Any) -> str:
    text = (side.text or "").strip()
    if text:
        return text
    return ", ".join(str(i) for i in side.images) or "(empty)"


class Confusion:
    """True label -> predicted label counts over the misses of one dataset (classification)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.pairs: Counter[tuple[int, int]] = Counter()
        self.misses = 0

    def add(self, row: int, predicted: int) -> None:
        """Row ``row`` (a miss) ranked its candidate ``predicted`` first."""
        self.add_rows(np.array([row]), np.array([predicted]))

    def add_rows(self, rows: np.ndarray, predicted: np.ndarray) -> None:
        """Rows ``rows`` (n,) (misses, in row order) ranked their candidates ``predicted`` (n,) first."""
        start = self.plan.cand_offsets[rows]
        true = self.plan.cand_flat[start + self.plan.positive[rows]]
        pred = self.plan.cand_flat[start + predicted]
        self.pairs.update(zip(true.tolist(), pred.tolist()))
        self.misses += int(rows.size)

    def top(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` most frequent confusions: ``[{"true", "predicted", "count"}]`` with the labels' texts."""
        sides = self.plan.sides
        return [
            {"true": _label(sides[t]), "predicted": _label(sides[p]), "count": c}
            for (t, p), c in self.pairs.most_common(n)
        ]

"""MMEB protocol: each query is ranked against its own candidate list, the positive at index 0;
the score is hit@1 (precision@1) per dataset and the unweighted mean over datasets (ANCHORS.md §1.5).

Candidates shared between queries are encoded once (de-duplicated by content, as VLM2Vec's
``cand_name``). Ties are counted fairly: a query whose positive ties with ``t`` other top candidates
scores ``1 / (1 + t)``, so a constant model scores exactly the chance level (VLM2Vec's ``argmax == 0``
would give it 1.0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmembed.data.formats import EvalExample
from mmembed.data.sample import Side

__all__ = ["evaluate", "hit_at_1", "side_key"]


def side_key(side: Side) -> tuple:
    """Content identity of an input: instruction, text and image references."""
    imgs = tuple(str(i) if isinstance(i, (str, os.PathLike)) else f"<{type(i).__name__}:{id(i)}>" for i in side.images)
    return (side.instruction or "", side.text or "", imgs)


def hit_at_1(scores: np.ndarray, positive: int = 0) -> float:
    """1 if the positive scores strictly highest, ``1/(1+t)`` if it ties with ``t`` others at the top, else 0."""
    pos = scores[positive]
    if (scores > pos).any():
        return 0.0
    return 1.0 / float((scores == pos).sum())


def _index(side: Side, keys: dict[tuple, int], sides: list[Side]) -> int:
    """Position of ``side`` among the unique inputs, appending it the first time it is seen."""
    k = side_key(side)
    if k not in keys:
        keys[k] = len(sides)
        sides.append(side)
    return keys[k]


def evaluate(
    model: Any, sets: dict[str, Sequence[EvalExample]], batch_size: int = 32, show_progress_bar: bool = False
) -> dict[str, Any]:
    """hit@1 per dataset and their mean, with the chance level of each dataset.

    Returns:
        ``{"datasets": {name: {"hit@1", "n", "chance"}}, "mean_hit@1": float}``.
    """
    out: dict[str, Any] = {"datasets": {}}
    for name, examples in sets.items():
        if not examples:
            raise ValueError(f"eval set '{name}' is empty")
        keys: dict[tuple, int] = {}
        sides: list[Side] = []
        q_idx = [_index(ex.query, keys, sides) for ex in examples]
        c_idx = [[_index(c, keys, sides) for c in ex.candidates] for ex in examples]
        emb = model.encode(
            texts=[s.text for s in sides],
            images=[list(s.images) or None for s in sides],
            instruction=[s.instruction for s in sides],
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
        )
        hits, chance = [], []
        for ex, qi, ci in zip(examples, q_idx, c_idx):
            if not ci:
                raise ValueError(f"{ex.source or name}: empty candidate list")
            scores = emb[ci] @ emb[qi]
            hits.append(hit_at_1(scores, ex.positive))
            chance.append(1.0 / len(ci))
        out["datasets"][name] = {"hit@1": float(np.mean(hits)), "n": len(hits), "chance": float(np.mean(chance))}
    vals = [d["hit@1"] for d in out["datasets"].values()]
    out["mean_hit@1"] = float(np.mean(vals)) if vals else float("nan")
    return out

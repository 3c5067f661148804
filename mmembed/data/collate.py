"""Samples -> model inputs: queries in one batch, targets (positives + hard negatives) in another.

Targets are grouped per query: ``[pos_0, neg_0_1 .. neg_0_k, pos_1, neg_1_1 .. neg_1_k, ...]`` so
target row ``j * (k + 1)`` is the positive of query ``j`` (the loss contract in docs/architecture.md §3).
Every query gets exactly ``k = num_negatives`` hard negatives:

- more than k: the first k are used;
- fewer (but at least one): the sample's own negatives are repeated cyclically; a repeated column
  only counts a real negative twice in the softmax denominator;
- none: the slots are filled with copies of the sample's positive and marked ``False`` in
  ``negative_mask`` (B, k). The loss must mask those columns, or they act as false negatives.

When the samples carry ``meta["target_keys"]`` (the readers set them: one content id per target),
the batch also has ``target_keys`` (B * (k + 1),) int64: equal ids are identical target contents,
e.g. the same class label for two queries, which a loss may mask as false in-batch negatives.

The collator only needs ``processor(sides) -> dict[str, Tensor]`` (pads to the longest in the batch)
and, for length grouping, ``processor.length(side) -> int``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from mmembed.data.sample import Sample, Side
from mmembed.data.skips import DataError

__all__ = ["Collator", "ProcessorLike", "select_negatives", "group_by_length", "sample_length", "collate_problem"]


class ProcessorLike(Protocol):
    placeholder: str

    def __call__(self, sides: list[Side]) -> dict[str, torch.Tensor]: ...

    def length(self, side: Side) -> int: ...


def select_negatives(sample: Sample, k: int) -> tuple[list[int], list[bool]]:
    """Indices into ``sample.negatives`` for exactly ``k`` slots (-1: filled with the positive) and
    which slots are real (see the module docstring)."""
    if k == 0:
        return [], []
    n = len(sample.negatives)
    if n == 0:
        return [-1] * k, [False] * k
    return [j % n for j in range(k)], [True] * k


class Collator:
    """``collator(samples) -> {"query": ..., "target": ..., "num_negatives": k, "negative_mask": (B, k)}``.

    ``query`` is ``processor`` output for the B query sides; ``target`` for the ``B * (k + 1)`` target
    sides in the grouped order. ``datasets`` lists each sample's dataset name (for per-task logging).
    """

    def __init__(self, processor: Callable[[list[Side]], dict[str, Any]], num_negatives: int = 0) -> None:
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.processor, self.num_negatives = processor, num_negatives

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        k = self.num_negatives
        targets: list[Side] = []
        mask: list[list[bool]] = []
        keys: list[int] = []
        have_keys = all(len(s.meta.get("target_keys") or []) == 1 + len(s.negatives) for s in samples)
        for s in samples:
            idx, real = select_negatives(s, k)
            targets.append(s.positive)
            targets.extend(s.negatives[j] if j >= 0 else s.positive for j in idx)
            mask.append(real)
            if have_keys:
                keys.extend(s.meta["target_keys"][j + 1 if j >= 0 else 0] for j in [-1, *idx])
        out = {
            "query": self.processor([s.query for s in samples]),
            "target": self.processor(targets),
            "num_negatives": k,
            "negative_mask": torch.tensor(mask, dtype=torch.bool).reshape(len(samples), k),
            "datasets": [s.dataset for s in samples],
        }
        if have_keys:
            out["target_keys"] = torch.tensor(keys, dtype=torch.long)
        return out


def sample_length(processor: ProcessorLike) -> Callable[[Sample], int]:
    """A length function for :func:`group_by_length`: query plus positive token estimate."""

    def length(s: Sample) -> int:
        return int(processor.length(s.query)) + int(processor.length(s.positive))

    return length


def group_by_length(items: Sequence[Any], length: Callable[[Any], int], window: int) -> list[int]:
    """An order of ``items`` that sorts each consecutive window of ``window`` items by length.

    Returns a permutation of ``range(len(items))``; the set inside each window is unchanged (so a
    global batch stays the same set), only its order, and hence which rank/chunk gets which, changes.
    The sort is stable, so equal lengths keep their order and the result is deterministic.
    """
    if window <= 1:
        return list(range(len(items)))
    lengths = [length(x) for x in items]
    order: list[int] = []
    for start in range(0, len(items), window):
        idx = list(range(start, min(start + window, len(items))))
        order.extend(sorted(idx, key=lambda j: lengths[j]))
    return order


def collate_problem(collate: Callable[[list[Sample]], Any], sample: Sample) -> str | None:
    """None if ``sample`` collates on its own, else the processor's error (to skip just that sample)."""
    try:
        collate([sample])
        return None
    except DataError:
        raise
    except Exception as e:
        return f"rejected by the processor: {type(e).__name__}: {e}"

"""Encoding for evaluation: unique inputs, an on-disk embedding cache, and sharding over ranks.

- **De-duplication.** Every query and candidate of a dataset is reduced to its content (instruction,
  text, image references); each distinct input is encoded once (VLM2Vec ``cand_name`` de-duplication,
  ``generate_cand_dataset``). Classification label sets shared by all queries cost one encode each.
  The plan (the distinct inputs and the rows as int32 index arrays) lives in :mod:`mmembed.eval.plan`.
- **Cache.** ``CACHE/<model fingerprint>/<dataset>-<data fingerprint>/part-*.npy`` + ``part-*.json``
  (row indices, dimension). Parts are written as they are encoded (array first, then its JSON, both
  renamed into place), so a run killed half-way leaves complete parts and a rerun encodes only the
  rest. No pickle: arrays are read with ``allow_pickle=False``. VLM2Vec ``eval.py`` caches pickles.
  The cache and the fingerprints live in :mod:`mmembed.eval.cache` (re-exported here).
- **Sharding.** Under ``torchrun``/``deepspeed`` each block of missing rows is split into equal,
  contiguous shares (padded by repeating a row, so every rank runs the same number of forwards, which
  ZeRO-3 requires); shares are gathered with :func:`mmembed.dist.all_gather_object`. Rank 0 writes the
  cache. Which rows are missing is decided on rank 0 and broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmembed import dist
from mmembed.data.dataset import decode_side
from mmembed.data.sample import Side
from mmembed.data.skips import BadSample
from mmembed.eval.cache import EmbeddingCache, dir_fingerprint, model_fingerprint
from mmembed.eval.plan import Plan, plan_dataset, side_key

__all__ = ["side_key", "Plan", "plan_dataset", "EmbeddingCache", "encode_plan", "dir_fingerprint", "model_fingerprint"]


# ----------------------------------------------------------------------------------------------
# encoding


class _Decode:
    """Map-style dataset decoding the images of each side (runs in DataLoader workers).

    Item ``i`` is ``(decoded side, None)`` or ``(None, reason)`` for an input whose image cannot be decoded: the
    evaluator scores such rows as misses instead of stopping (MMEB keeps them in the denominator)."""

    def __init__(self, sides: Sequence[Side], max_pixels: int | None = None) -> None:
        self.sides, self.max_pixels = sides, max_pixels

    def __len__(self) -> int:
        return len(self.sides)

    def __getitem__(self, i: int) -> tuple[Side | None, str | None]:

        try:
            if self.max_pixels is None:
                return decode_side(self.sides[i]), None
            return decode_side(self.sides[i], self.max_pixels), None
        except BadSample as e:
            return None, e.detail


def _identity(x: Any) -> Any:
    return x


def _encode_sides(
    model: Any,
    sides: Sequence[Side],
    batch_size: int,
    num_workers: int,
    group: int = 256,
    on_rows: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """``(len(sides), D)`` embeddings (rows of unreadable inputs are 0) and ``{position: reason}`` of those.

    Images are decoded ``group`` rows at a time (in ``num_workers`` DataLoader workers when > 0), so memory holds
    one group of decoded images, never the whole block. ``on_rows(k)`` is called after each group of ``k`` rows."""
    max_pixels = getattr(getattr(model, "processor", None), "max_pixels", None)
    decoder = _Decode(sides, max_pixels)
    items: Any = (decoder[i] for i in range(len(sides)))
    if num_workers > 0 and any(s.images for s in sides):
        from torch.utils.data import DataLoader

        items = iter(DataLoader(decoder, batch_size=None, num_workers=num_workers, collate_fn=_identity))
    out: np.ndarray | None = None
    bad: dict[int, str] = {}
    for start in range(0, len(sides), group):
        chunk = [next(items) for _ in range(min(group, len(sides) - start))]
        good = [j for j, (side, _) in enumerate(chunk) if side is not None]
        bad.update({start + j: reason for j, (side, reason) in enumerate(chunk) if side is None})
        if not good:
            if on_rows is not None:
                on_rows(len(chunk))
            continue
        emb = model.encode(
            texts=[chunk[j][0].text for j in good],
            images=[list(chunk[j][0].images) or None for j in good],
            instruction=[chunk[j][0].instruction for j in good],
            batch_size=batch_size,
            show_progress_bar=False,
        )
        emb = np.asarray(emb, dtype=np.float32)
        if out is None:
            out = np.zeros((len(sides), emb.shape[1]), dtype=np.float32)
        out[[start + j for j in good]] = emb
        if on_rows is not None:
            on_rows(len(chunk))
    return (out if out is not None else np.zeros((len(sides), 0), dtype=np.float32)), bad


def encode_plan(
    model: Any,
    plan: Plan,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    cache: EmbeddingCache | None = None,
    block_rows: int = 1024,
    dim: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Embeddings of every unique input of ``plan``: ``(U, D)`` float32; rows of missing inputs are 0.

    Collective under a process group: every rank must call it with the same plan. Returns the
    embeddings (identical on every rank) and ``{"encoded", "cached", "missing"}`` row counts.
    ``progress(total)``, when given, is called once with the number of inputs to encode and returns an
    object with ``update(n)`` and ``close()`` (a :class:`mmembed.progress.Progress`); it counts inputs
    of every rank (rank 0's share times the world size, exact at the end of each block).
    """
    n = len(plan.sides)
    cached, have, error = None, np.zeros(n, dtype=bool), None
    if cache is not None and dist.is_main_process():
        try:
            cached, have = cache.load(plan, dim)
        except ValueError as e:  # raised on every rank below, so that no rank waits forever
            error = str(e)
    have, error = dist.broadcast_object((have, error))
    if error:
        raise ValueError(error)
    todo = np.nonzero(~have & ~plan.missing)[0]
    stats = {"encoded": int(todo.size), "cached": int(have.sum()), "missing": int(plan.missing.sum())}
    bar = progress(int(todo.size)) if progress is not None else None
    try:
        parts, unreadable = _encode_blocks(model, plan, todo, batch_size, num_workers, cache, block_rows, dim, bar)
    finally:
        if bar is not None:
            bar.close()
    if parts:
        dim = dim or parts[0][1].shape[1]
    _mark_unreadable(plan, unreadable)
    if dist.get_world_size() > 1 and cache is not None:
        cached = dist.broadcast_object(cached)
    d = dim or (cached.shape[1] if cached is not None else None)
    if d is None:  # every input has a missing or unreadable image
        return np.zeros((n, 1), dtype=np.float32), stats
    full = np.zeros((n, d), dtype=np.float32)
    if cached is not None:
        if cached.shape[1] != d:
            raise ValueError(
                f"embedding cache of eval set '{plan.name}': dimension {cached.shape[1]} but the model gives {d}"
            )
        full[have] = cached[have]
    for idx, emb in parts:
        full[idx] = emb
    return full, stats


def _encode_blocks(
    model: Any,
    plan: Plan,
    todo: np.ndarray,
    batch_size: int,
    num_workers: int,
    cache: EmbeddingCache | None,
    block_rows: int,
    dim: int | None,
    bar: Any,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[int, str]]:
    """Encode the inputs ``todo`` block by block (sharded over ranks, cached on rank 0): ``(parts, unreadable)``."""
    world, rank = dist.get_world_size(), dist.get_rank()
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    unreadable: dict[int, str] = {}
    step = max(block_rows, world * batch_size)
    for start in range(0, todo.size, step):
        block = todo[start : start + step]
        share = -(-block.size // world)
        mine = block[rank * share : (rank + 1) * share]
        real = mine.size
        if real < share:  # equal forwards on every rank: pad with a repeat of the block's first row
            mine = np.concatenate([mine, np.full(share - real, block[0])])
        credited = [0]

        def tick(k: int, block_size: int = int(block.size), credited: list[int] = credited) -> None:
            add = min(k * world, block_size - credited[0])
            if add > 0 and bar is not None:
                bar.update(add)
                credited[0] += add

        try:
            out, bad = _encode_sides(model, [plan.sides[i] for i in mine], batch_size, num_workers, on_rows=tick)
            out, bad, error = out[:real], {int(mine[j]): r for j, r in bad.items() if j < real}, None
        except Exception as e:  # noqa: BLE001 - re-raised on every rank after the gather
            if world == 1:
                raise
            out, bad = np.zeros((0, 0), dtype=np.float32), {}
            error = f"eval set '{plan.name}', rank {rank}: {e}"
        gathered = dist.all_gather_object((mine[:real], out, error, bad))
        errors = [g[2] for g in gathered if g[2]]
        if errors:
            raise RuntimeError(errors[0])
        if bar is not None and block.size > credited[0]:
            bar.update(int(block.size) - credited[0])
        for g in gathered:
            unreadable.update(g[3])
        idx = np.concatenate([g[0] for g in gathered])
        emb = np.concatenate([g[1] for g in gathered if g[1].size] or [out])
        if unreadable:  # never cache an unreadable input: a fixed file is encoded on the next run
            keep = ~np.isin(idx, list(unreadable))
            idx, emb = idx[keep], emb[keep]
        if not idx.size:
            continue
        if dim is None:
            dim = emb.shape[1]
        elif emb.shape[1] != dim:
            raise ValueError(f"eval set '{plan.name}': the model gives {emb.shape[1]}-dim embeddings, expected {dim}")
        if cache is not None and dist.is_main_process():
            cache.write(plan, idx, emb)
        parts.append((idx, emb))
    return parts, unreadable


def _mark_unreadable(plan: Plan, unreadable: dict[int, str]) -> None:
    """Treat inputs whose image could not be decoded like missing ones: every row using them is a miss."""
    if not unreadable:
        return
    bad = np.zeros(len(plan.sides), dtype=bool)
    bad[list(unreadable)] = True
    plan.missing |= bad
    rows = plan.rows_using(bad)
    plan.unreadable_rows = rows & ~plan.missing_rows
    plan.missing_rows = plan.missing_rows | rows
    first_row = int(np.nonzero(rows)[0][0])
    src = plan.examples[first_row].source or f"row {first_row + 1}"
    first_side = int(next(i for i in (plan.query_idx[first_row], *plan.row_cands(first_row)) if bad[i]))
    plan.unreadable_example = f"{src}: {unreadable[first_side]}"

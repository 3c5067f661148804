"""GradCache: a contrastive step over a large batch with the activation memory of one chunk.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(luyug/GradCache ``src/grad_cache/grad_cache.py``), as used by VLM2Vec and Tevatron; docs/algorithms.md §7:

1. no-grad forward of every chunk, recording the RNG state before each chunk (CPU and CUDA);
2. the loss on the detached, concatenated representations; its gradient w.r.t. them is the *cache*
   (the cross-rank gather happens inside the loss, so the cache holds dL_global / d local reps);
3. per chunk: restore its RNG state (dropout masks replay exactly), re-forward with grad and
   back-propagate ``sum(reps * cache)``; parameter gradients accumulate over the chunks.

The result equals the gradient of the full-batch loss computed in one graph with the same dropout
masks. The step is model-agnostic: ``encode_fn`` maps a (sub-)batch to (n, D) embeddings and
``backward_fn`` runs the backward (``Tensor.backward`` by default; the DeepSpeed engine's ``backward``
in training, with ``before_backward`` setting the gradient-accumulation boundary, see
``mmembed.train.deepspeed_utils.gradcache_engine_hooks``). Differences from luyug/GradCache: one
encoder for both sides, works on one process as well as many (no DDP ``no_sync`` needed), and the
loss's own parameters (a learnable temperature) get their gradient through ``backward_fn`` too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["GradCacheResult", "RngState", "split_batch", "gradcache_step"]

Batch = Any
EncodeFn = Callable[[Batch], torch.Tensor]
SplitFn = Callable[[Batch, int], Sequence[Batch]]
LossFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict[str, Any]]"]


@dataclass
class GradCacheResult:
    """What one GradCache step returns.

    Attributes:
        loss: the loss for logging, detached: ``stats["loss"]`` when the loss function returns stats
            (for ``InfoNCELoss`` the global mean loss, *without* the world-size factor), else the value
            that was differentiated.
        stats: the loss function's stats dict (empty if it returns none).
        num_chunks: number of re-forward/backward calls (query chunks + target chunks).
    """

    loss: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    num_chunks: int = 0


@dataclass
class RngState:
    """CPU and (if initialized) CUDA generator states, captured and restored as one (GradCache's ``RandContext``)."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def split_batch(batch: Batch, chunk_size: int) -> list[Batch]:
    """Split a batch into consecutive chunks of ``chunk_size`` rows (the last may be smaller).

    ``batch`` is a tensor (split along dim 0) or a mapping whose tensor and list values all have the
    same first dimension ``n`` (the row count); other values (None, scalars, strings) are copied into
    every chunk. Batches whose tensors do not share one row dimension (e.g. Qwen2-VL's flattened
    ``pixel_values``) need a model-specific ``split_fn``.
    """
    if chunk_size < 1:
        raise ValueError(f"train.gradcache_chunk_size must be >= 1, got {chunk_size}")
    if isinstance(batch, torch.Tensor):
        return list(batch.split(chunk_size, dim=0))
    if not isinstance(batch, Mapping):
        raise TypeError(f"split_batch expects a tensor or a mapping, got {type(batch).__name__}")
    rows = {
        k: (v.shape[0] if isinstance(v, torch.Tensor) else len(v))
        for k, v in batch.items()
        if isinstance(v, (torch.Tensor, list, tuple))
    }
    if not rows:
        raise ValueError("split_batch: the batch has no tensor or list values to split")
    sizes = set(rows.values())
    if len(sizes) != 1:
        raise ValueError(f"split_batch: values have different row counts {rows}; pass a model-specific split_fn")
    n = sizes.pop()
    chunks = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        chunks.append({k: (v[start:stop] if k in rows else v) for k, v in batch.items()})
    return chunks


def _has_trainable_parameters(loss_fn: Any, loss_params: Sequence[torch.Tensor] | None) -> bool:
    """Whether the loss has parameters to train: ``loss_params`` if given, else an ``nn.Module``'s own."""
    if loss_params is not None:
        return any(p.requires_grad for p in loss_params)
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return isinstance(loss_fn, nn.Module) and any(p.requires_grad for p in loss_fn.parameters())


def gradcache_step(
    encode_fn: EncodeFn,
    query_batch: Batch,
    target_batch: Batch,
    loss_fn: LossFn,
    chunk_size: int,
    *,
    target_chunk_size: int | None = None,
    split_fn: SplitFn = split_batch,
    backward_fn: Callable[[torch.Tensor], Any] | None = None,
    before_backward: Callable[[int, bool], Any] | None = None,
    loss_params: Sequence[torch.Tensor] | None = None,
) -> GradCacheResult:
    """Accumulate into the parameters the gradient of ``loss_fn(encode(queries), encode(targets))``.

    Args:
        encode_fn: ``encode_fn(sub_batch) -> (n, D)`` embeddings (normalized if the loss expects it).
            Called twice per chunk: under ``torch.no_grad`` and then with grad.
        query_batch: queries of this rank, Bq rows.
        target_batch: targets of this rank, Bq * (1 + k) rows grouped per query ``[pos, negs...]``.
        loss_fn: ``loss_fn(q (Bq, D), t (Bt, D))`` returning a scalar, or ``(scalar, stats)``
            (e.g. ``functools.partial(InfoNCELoss(...), return_stats=True)``). The scalar is what gets
            differentiated, so a cross-rank loss must already carry its world-size factor (as
            ``InfoNCELoss`` does); do not divide by the number of chunks.
        chunk_size: rows per query chunk.
        target_chunk_size: rows per target chunk; defaults to ``chunk_size`` (each side is chunked
            independently, so with k hard negatives there are about (1 + k) times more target chunks).
        split_fn: ``split_fn(batch, rows) -> list of sub-batches`` (``split_batch`` by default).
        backward_fn: runs the backward of a scalar; defaults to ``Tensor.backward``. Pass
            ``engine.backward`` under DeepSpeed.
        before_backward: called as ``before_backward(chunk_index, is_last)`` before every backward
            (queries' chunks first, then targets'); under DeepSpeed it sets the gradient-accumulation
            boundary so the reduction happens once, after the last chunk.
        loss_params: the loss's trainable tensors (a learnable temperature). None (default) finds
            them on an ``nn.Module`` loss, also inside ``functools.partial``; pass them explicitly when
            the module sits elsewhere (e.g. in a partial's arguments). If there are any, their gradient
            is obtained by recomputing the loss on the cached, detached representations inside the last
            chunk's backward, so it goes through ``backward_fn`` like every other gradient (a gradient
            taken in step 2 directly is lost by ZeRO-3's hooks). The recomputation repeats the loss's
            cross-rank gather once.

    Returns:
        A ``GradCacheResult`` (detached loss for logging and the loss stats). The caller then runs
        the optimizer step (``engine.step()`` / ``optimizer.step()``).

    Notes:
        Every rank must run the same number of chunks under DeepSpeed (ZeRO-3 gathers parameters
        collectively in each forward, and the reduction at the boundary is collective): keep the local
        batch size equal on all ranks. The RNG state after the step equals the state after the
        no-grad pass, i.e. as if each chunk had been encoded once.
    """
    q_chunks = list(split_fn(query_batch, chunk_size))
    t_chunks = list(split_fn(target_batch, target_chunk_size or chunk_size))
    if not q_chunks or not t_chunks:
        raise ValueError("gradcache_step: empty query or target batch")
    chunks = [(0, c) for c in q_chunks] + [(1, c) for c in t_chunks]
    backward = backward_fn if backward_fn is not None else torch.Tensor.backward

    # 1. no-grad pass, one RNG snapshot per chunk.
    rng_states: list[RngState] = []
    reps: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    with torch.no_grad():
        for side, chunk in chunks:
            rng_states.append(RngState.capture())
            reps[side].append(encode_fn(chunk))
    rng_after = RngState.capture()

    # 2. loss and its gradient w.r.t. the detached representations (the cache).
    q = torch.cat(reps[0]).detach().requires_grad_()  # (Bq, D)
    t = torch.cat(reps[1]).detach().requires_grad_()  # (Bt, D)
    with torch.enable_grad():
        out = loss_fn(q, t)
        loss, stats = out if isinstance(out, tuple) else (out, {})
        cache_q, cache_t = torch.autograd.grad(loss, [q, t], allow_unused=True, materialize_grads=True)
    caches = (
        list(cache_q.split([r.shape[0] for r in reps[0]])),
        list(cache_t.split([r.shape[0] for r in reps[1]])),
    )
    recompute = _has_trainable_parameters(loss_fn, loss_params)
    q_cached, t_cached = (q.detach(), t.detach()) if recompute else (None, None)
    del q, t, reps

    # 3. re-forward each chunk with its RNG state and back-propagate the cached gradient.
    counters = [0, 0]
    for index, (side, chunk) in enumerate(chunks):
        is_last = index == len(chunks) - 1
        rng_states[index].restore()
        with torch.enable_grad():
            rep = encode_fn(chunk)
            cache = caches[side][counters[side]]
            counters[side] += 1
            surrogate = (rep.float() * cache.float()).sum()
            if is_last and recompute:  # only the loss's own parameters get a gradient from this term
                extra = loss_fn(q_cached, t_cached)
                surrogate = surrogate + (extra[0] if isinstance(extra, tuple) else extra)
        if before_backward is not None:
            before_backward(index, is_last)
        backward(surrogate)
    rng_after.restore()

    logged = stats.get("loss", loss)
    return GradCacheResult(loss=torch.as_tensor(logged).detach(), stats=dict(stats), num_chunks=len(chunks))

"""Collective helpers: the only place outside ``mmembed/train/`` that calls ``torch.distributed``.

Every helper degrades to the single-process answer when no process group is initialized, so the
loss and the model run unchanged on one CPU process (open_clip's ``gather_features`` and
sentence-transformers' ``util.distributed`` follow the same rule).

The gather used for cross-device negatives is the Tevatron / VLM2Vec trick: ``all_gather`` without
gradient, then the local slot is replaced by the grad-carrying local tensor, so the gradient of a
loss computed on the gathered tensor flows only into the local shard (docs/algorithms.md §7).
"""

from __future__ import annotations

import builtins
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "broadcast_object",
    "all_gather_object",
    "all_gather_rows",
    "shard_range",
    "init_from_env",
    "shutdown",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_gather_with_local_grad",
    "print0",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialized (even of world size 1)."""
    return dist.is_available() and dist.is_initialized()


def init_from_env() -> bool:
    """Join the process group a launcher (``torchrun``, ``deepspeed``) describes in ``WORLD_SIZE`` etc.

    Returns True when this call initialized a group (then call :func:`shutdown` at the end), False
    when a group already exists or the process runs alone (no ``WORLD_SIZE`` > 1 in the environment).
    Backend: nccl when CUDA is available (the device is set from ``LOCAL_RANK``), else gloo.
    """
    import os

    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def shutdown() -> None:
    """Destroy the default process group if there is one."""
    if is_distributed():
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on global rank 0 (and on a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank (pickled; small objects only)."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order, on every rank (pickled in transit; ``[obj]`` without a group)."""
    if not is_distributed() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_range(n: int) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` items: ``ceil(n / world)`` each, the last ones shorter.

    Rank order equals item order, so concatenating the shares in rank order (:func:`all_gather_rows`) restores it.
    """
    world, rank = get_world_size(), get_rank()
    share = -(-n // world)
    return min(n, rank * share), min(n, (rank + 1) * share)


def all_gather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's per-row arrays concatenated along axis 0 in rank order, on every rank.

    Args:
        arrays: ``{name: (n_r, ...)}`` on rank ``r`` (the same names everywhere; ``n_r`` may differ and be 0).

    Returns:
        ``{name: (sum_r n_r, ...)}``; without a process group (or with one rank) ``arrays`` itself.
        Pickled in transit (:func:`all_gather_object`): meant for per-query results, not embeddings of a corpus.
    """
    if not is_distributed() or get_world_size() == 1:
        return arrays
    parts = all_gather_object(arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, returned as a new tensor (``x`` is left untouched); no gradient."""
    out = x.detach().clone()
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (e.g. a loss for logging), as a new tensor; no gradient."""
    out = all_reduce_sum(x)
    return out / get_world_size() if out.is_floating_point() else out


def all_gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, keeping the gradient on the local rows only.

    Args:
        x: ``(n_r, ...)`` on rank ``r``. The trailing dimensions and dtype must agree on every rank;
            the first dimension may differ (the sizes are exchanged first, rows are padded for the
            collective and trimmed afterwards), and it may be 0.

    Returns:
        ``(sum_r n_r, ...)`` in rank order. Rows of the other ranks are detached copies; the rows
        of this rank are ``x`` itself, so ``backward`` reaches ``x``. Without a process group, or
        with world size 1, ``x`` is returned unchanged.

    Every rank that then computes the same global loss ``L`` gets ``dL/dx_local``; because DDP and
    the DeepSpeed engine *average* gradients over ranks, multiply ``L`` by the world size before
    ``backward`` to obtain the single-process gradient of the global batch (see ``InfoNCELoss``).
    """
    world = get_world_size()
    if world == 1:
        return x
    rank = get_rank()
    local_n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(local_n) for _ in range(world)]
    dist.all_gather(sizes, local_n)
    counts = [int(s.item()) for s in sizes]
    max_n = max(counts)
    payload = x.detach()
    if payload.shape[0] < max_n:
        pad = payload.new_zeros((max_n - payload.shape[0], *payload.shape[1:]))
        payload = torch.cat([payload, pad], dim=0)
    slots = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(slots, payload.contiguous())
    parts = [slot[:n] for slot, n in zip(slots, counts)]
    parts[rank] = x
    return torch.cat(parts, dim=0)


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        builtins.print(*args, **kwargs)

"""Shared pieces of the multi-rank workers: a tiny encoder with dropout, data, a reference step, diffs.

Imported by the worker scripts (run under ``torchrun``), never collected by pytest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

D_IN, D_HID, D_OUT = 16, 32, 8


class TinyEncoder(nn.Module):
    """(n, D_IN) -> (n, D_OUT) L2-normalized, with dropout so that RNG replay matters."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, D_HID), nn.GELU(), nn.Dropout(p), nn.Linear(D_HID, D_OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def make_model(seed: int = 0, p: float = 0.1) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder(p)


def make_global_batch(n_queries: int, negatives: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (N, D_IN) and grouped targets (N * (1 + negatives), D_IN); positives near their query."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_queries, D_IN, generator=g)
    t = torch.randn(n_queries, 1 + negatives, D_IN, generator=g)
    t[:, 0] = q + 0.5 * t[:, 0]
    return q, t.reshape(-1, D_IN)


def shard(q: torch.Tensor, t: torch.Tensor, sizes: list[int], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s queries and target groups when ranks hold ``sizes`` queries each."""
    group = t.shape[0] // q.shape[0]
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    return q[start:stop], t[start * group : stop * group]


def encode_like_ranks(
    encode: Callable[[torch.Tensor], torch.Tensor],
    shards: list[tuple[torch.Tensor, torch.Tensor]],
    chunk: int | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every rank's shard in one process with grad, replaying each rank's RNG stream.

    Rank r seeds ``seed + r`` and encodes its query chunks, then its target chunks (the order of the
    GradCache no-grad pass; ``chunk=None`` means one chunk per side), so dropout masks match the ranks'.
    """
    qs, ts = [], []
    for r, (q, t) in enumerate(shards):
        torch.manual_seed(seed + r)
        step_q = chunk or q.shape[0]
        step_t = chunk or t.shape[0]
        qs.append(torch.cat([encode(c) for c in q.split(step_q)]))
        ts.append(torch.cat([encode(c) for c in t.split(step_t)]))
    return torch.cat(qs), torch.cat(ts)


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|b| (b is the reference)."""
    out = 0.0
    for k in b:
        denom = b[k].abs().max().clamp_min(1e-12)
        out = max(out, float((a[k] - b[k]).abs().max() / denom))
    return out


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def write_result(name: str, payload: dict) -> None:
    """Write this rank's results to ``$MMEMBED_TEST_OUT/<name>.rank<r>.json`` (judged by the test)."""
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ["MMEMBED_TEST_OUT"]) / f"{name}.rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.rename(out)

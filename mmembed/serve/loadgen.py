"""A closed-loop load generator for ``mmembed serve``: N client threads, each with one request in flight.

Used by the load tests (``tests/serve/test_load.py``, over the OpenAI client) and ``tools/bench_serve.py`` (over
httpx). Each client thread builds its own sender (``make_sender()`` -> ``send(i)``, e.g. one HTTP connection per
thread) and takes the next request index until all ``n`` are sent; every request's latency and result (or error)
is kept at its own index, so a lost or misrouted answer shows up as a missing or mismatched entry.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LoadResult", "run_load", "batch_sizes"]


@dataclass
class LoadResult:
    """Per-request latencies (seconds) and results (``None`` where the request raised: see ``errors``)."""

    latencies: np.ndarray
    results: list[Any]
    wall_s: float
    errors: dict[int, BaseException] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return len(self.results) / self.wall_s if self.wall_s > 0 else float("nan")

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile latency in milliseconds (over the requests that succeeded)."""
        ok = self.latencies[~np.isnan(self.latencies)]
        return float(np.percentile(ok, q) * 1000) if ok.size else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "requests": float(len(self.results)),
            "errors": float(len(self.errors)),
            "requests_per_s": self.requests_per_s,
            "p50_ms": self.percentile_ms(50),
            "p99_ms": self.percentile_ms(99),
        }


def run_load(make_sender: Callable[[], Callable[[int], Any]], n: int, clients: int = 8) -> LoadResult:
    """Send requests ``0..n-1`` from ``clients`` threads (closed loop); returns every latency and result."""
    latencies = np.full(n, np.nan)
    results: list[Any] = [None] * n
    errors: dict[int, BaseException] = {}
    lock = threading.Lock()
    next_index = iter(range(n))

    def client() -> None:
        send = make_sender()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                results[i] = send(i)
                latencies[i] = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - recorded per request, reported by the caller
                with lock:
                    errors[i] = e

    threads = [threading.Thread(target=client, name=f"load-client-{k}", daemon=True) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(latencies, results, time.perf_counter() - start, errors)


_SAMPLE = re.compile(r'^mmembed_batch_size_(count|sum|bucket)(?:\{le="([^"]+)"\})? ([0-9.e+-]+)$', re.MULTILINE)


def batch_sizes(metrics_text: str) -> dict[str, Any]:
    """``{"batches", "rows", "mean", "buckets": {le: count}}`` of the server's batch-size histogram (``/metrics``)."""
    out: dict[str, Any] = {"batches": 0.0, "rows": 0.0, "buckets": {}}
    for kind, le, value in _SAMPLE.findall(metrics_text):
        if kind == "count":
            out["batches"] = float(value)
        elif kind == "sum":
            out["rows"] = float(value)
        else:
            out["buckets"][le] = float(value)
    out["mean"] = out["rows"] / out["batches"] if out["batches"] else float("nan")
    return out

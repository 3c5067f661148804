"""Prometheus metrics of ``mmembed serve`` (``GET /metrics``), in a registry of the app's own.

- ``mmembed_requests_total{endpoint, status}``: answered HTTP requests (every status, 401 and 413 included);
- ``mmembed_request_latency_seconds{endpoint}``: time from the request's arrival to its response;
- ``mmembed_batch_size``: inputs per dynamic batch the worker encoded (one observation per batch);
- ``mmembed_batch_latency_seconds``: model time per batch;
- ``mmembed_queue_depth``: requests waiting for the worker (not yet taken into a batch);
- ``mmembed_inputs_total``: inputs embedded; ``mmembed_rejected_total{reason}``: 503s of a full queue and
  timeouts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "ENDPOINTS"]

#: paths with their own label; anything else is counted as ``other`` (no label per unknown path)
ENDPOINTS = ("/v1/embeddings", "/v1/search", "/v1/models", "/health", "/metrics")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The counters and histograms of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mmembed_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "mmembed_request_latency_seconds",
            "request latency, arrival to response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mmembed_batch_size", "inputs per dynamic batch encoded by the worker", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "mmembed_batch_latency_seconds", "model time per dynamic batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("mmembed_queue_depth", "requests waiting for the model worker", registry=r)
        self.inputs = Counter("mmembed_inputs", "inputs embedded", registry=r)
        self.rejected = Counter("mmembed_rejected", "requests refused by the batcher", ["reason"], registry=r)

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from ``depth()`` at every scrape."""
        self.queue_depth.set_function(depth)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

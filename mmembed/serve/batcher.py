"""Dynamic batching: one worker thread owns the model and encodes the rows of concurrent requests together.

A request becomes a :class:`Job` (its rows, each with its resolved instruction) in a bounded queue. The worker
takes the first job waiting, then keeps taking jobs for ``window_ms`` milliseconds (0: only what is queued at that
moment) or until ``max_batch`` rows are gathered; a job larger than what is left of the batch is split, its rest
opening the next batch. The batch is encoded in one :meth:`~mmembed.model.EmbeddingModel.encode` call per kind,
text-only rows apart from rows with images (``encode`` orders each group by length, so padding stays small), and
each row's vector is written into its own job's output; a job's future resolves when its last row is done.

A full queue refuses the request at once (:class:`QueueFull`, answered 503) rather than growing. A row the model
refuses (a placeholder count that does not match, too many images) fails only its own request: the batch is
encoded again job by job to find it. A job whose request gave up (timeout) is skipped.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmembed.images import ImageError
from mmembed.serve.inputs import Item, ServeError
from mmembed.serve.metrics import Metrics
from mmembed.types import InputError, Side

__all__ = ["Job", "Batcher", "QueueFull"]

log = logging.getLogger(__name__)

_ROW = re.compile(r"^row (\d+): ")


class QueueFull(Exception):
    """The request queue holds ``max_queue`` requests already."""


@dataclass
class Job:
    """One request's rows and where their vectors go: ``future`` resolves to ``(embeddings (N, D), tokens)``."""

    items: list[Item]
    instructions: list[str | None]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    out: np.ndarray | None = None
    tokens: int = 0
    remaining: int = 0

    def __post_init__(self) -> None:
        self.remaining = len(self.items)

    def fail(self, error: BaseException) -> None:
        """Resolve the future with ``error`` unless it is already resolved or cancelled."""
        if not self.future.done():
            try:
                self.future.set_exception(error)
            except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                pass

    def put(self, i: int, vector: np.ndarray, tokens: int) -> None:
        """Row ``i``'s vector; the last row resolves the future."""
        assert self.out is not None
        self.out[i] = vector
        self.tokens += tokens
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            try:
                self.future.set_result((self.out, self.tokens))
            except concurrent.futures.InvalidStateError:
                pass


class Batcher:
    """The worker thread and its bounded queue (see the module docstring).

    Args:
        model: an :class:`~mmembed.model.EmbeddingModel` (anything with its ``encode``, ``embed_dim``, ``processor``).
        max_batch: most rows per batch.
        window_ms: how long the worker waits for more requests after the first one of a batch.
        max_queue: most requests waiting; the next is refused with :class:`QueueFull`.
        metrics: where batch sizes, model time and the queue depth are recorded.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 64,
        window_ms: float = 5.0,
        max_queue: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or window_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window_ms >= 0")
        self.model, self.max_batch, self.window = model, int(max_batch), float(window_ms) / 1000.0
        self.metrics = metrics or Metrics()
        self.metrics.track_queue(lambda: self.depth)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=int(max_queue))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches encoded, rows in them, and the largest batch (as the batch-size histogram)
        self.rows = 0
        self.largest = 0

    @property
    def depth(self) -> int:
        """Requests waiting for the worker."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mmembed-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current batch; waiting requests fail with 503."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.fail(ServeError(503, "the server is shutting down", type="server_error", code="shutting_down"))

    def submit(self, items: list[Item], instructions: list[str | None]) -> Job:
        """Queue one request's rows; raises :class:`QueueFull` when ``max_queue`` requests are waiting."""
        job = Job(items, instructions)
        job.out = np.empty((len(items), self.model.embed_dim), dtype=np.float32)
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.rejected.labels("queue_full").inc()
            raise QueueFull(f"the request queue is full ({self._queue.maxsize} requests waiting)") from None
        return job

    # ------------------------------------------------------------------------------------------
    # the worker

    def _run(self) -> None:
        pending: deque[tuple[Job, int]] = deque()  # rows taken from the queue, not yet encoded
        while not self._stop.is_set():
            if not pending:
                try:
                    pending.extend(self._rows_of(self._queue.get(timeout=0.1)))
                except queue.Empty:
                    continue
            deadline = time.monotonic() + self.window
            while len(pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                pending.extend(self._rows_of(job))
            batch = [pending.popleft() for _ in range(min(self.max_batch, len(pending)))]
            batch = [(job, i) for job, i in batch if not job.future.done()]  # gave up (timeout) or failed
            if batch:
                try:
                    self._encode_batch(batch)
                except Exception as e:  # noqa: BLE001 - the worker must outlive any one batch
                    log.exception("batch of %d rows failed", len(batch))
                    for job, _ in batch:
                        job.fail(ServeError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @staticmethod
    def _rows_of(job: Job) -> list[tuple[Job, int]]:
        return [] if job.future.done() else [(job, i) for i in range(len(job.items))]

    def _encode(self, items: list[Item], instructions: list[str | None]) -> np.ndarray:
        """One ``model.encode`` call, full width (each request truncates its own copy)."""
        return self.model.encode(
            texts=[it.text for it in items],
            images=[it.images or None for it in items],
            instruction=list(instructions),
            batch_size=self.max_batch,
            show_progress_bar=False,
            truncate_dim=self.model.embed_dim,
        )

    def _tokens(self, items: list[Item], instructions: list[str | None]) -> list[int]:
        """Tokens each row puts through the model (placeholders expanded; an estimate where the processor has no
        tokenizer of its own)."""
        processor = self.model.processor
        sides = [Side(instruction=s, text=it.text, images=list(it.images)) for it, s in zip(items, instructions)]
        tokenize = getattr(processor, "tokenize", None)
        if tokenize is not None:
            try:
                return [len(ids) for ids, _ in tokenize(sides)]
            except Exception:  # noqa: BLE001 - usage is informative; never fail a request for it
                pass
        return [int(processor.length(side)) for side in sides]

    def _encode_batch(self, batch: list[tuple[Job, int]]) -> None:
        self.batches += 1  # counted before the answers go out: a client that has its answer sees its batch counted
        self.rows += len(batch)
        self.largest = max(self.largest, len(batch))
        self.metrics.batch_size.observe(len(batch))
        self.metrics.inputs.inc(len(batch))
        start = time.perf_counter()
        for kind in ("text", "image"):
            rows = [(job, i) for job, i in batch if job.items[i].kind == kind]
            if rows:
                self._encode_rows(rows)
        self.metrics.batch_latency.observe(time.perf_counter() - start)

    def _encode_rows(self, rows: list[tuple[Job, int]]) -> None:
        items = [job.items[i] for job, i in rows]
        instructions = [job.instructions[i] for job, i in rows]
        try:
            emb = self._encode(items, instructions)
        except (InputError, ImageError, ValueError, TypeError) as e:
            by_job: dict[int, list[tuple[Job, int]]] = {}
            for job, i in rows:
                by_job.setdefault(id(job), []).append((job, i))
            if len(by_job) == 1:
                self._refuse(rows, e)
            else:  # find the request the model refuses: each job alone, the others still get their vectors
                for part in by_job.values():
                    self._encode_alone(part)
            return
        except Exception as e:  # noqa: BLE001 - the model failed (out of memory...): fail these requests, go on
            log.exception("encode failed for a batch of %d rows", len(rows))
            for job, _ in rows:
                job.fail(ServeError(500, f"the model failed: {type(e).__name__}: {e}", type="server_error"))
            return
        tokens = self._tokens(items, instructions)
        for (job, i), vec, t in zip(rows, emb, tokens):
            job.put(i, vec, t)

    def _encode_alone(self, rows: list[tuple[Job, int]]) -> None:
        """The rows of one job on their own; a refusal fails that job with 400 naming its ``input[i]``."""
        job = rows[0][0]
        items = [job.items[i] for _, i in rows]
        instructions = [job.instructions[i] for _, i in rows]
        try:
            emb = self._encode(items, instructions)
        except (InputError, ImageError, ValueError, TypeError) as e:
            self._refuse(rows, e)
            return
        except Exception as e:  # noqa: BLE001
            log.exception("encode failed for a request of %d rows", len(rows))
            job.fail(ServeError(500, f"the model failed: {type(e).__name__}: {e}", type="server_error"))
            return
        for (_, i), vec, t in zip(rows, emb, self._tokens(items, instructions)):
            job.put(i, vec, t)

    @staticmethod
    def _refuse(rows: list[tuple[Job, int]], error: Exception) -> None:
        """Fail the one job of ``rows`` with 400; ``row k`` of the model's message becomes the request's
        ``input[i]``."""
        text = str(error)
        m = _ROW.match(text)
        if m and int(m.group(1)) < len(rows):
            text = f"input[{rows[int(m.group(1))][1]}]: {text[m.end() :]}"
        rows[0][0].fail(ServeError(400, text, code="invalid_input"))

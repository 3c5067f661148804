"""Bad-sample accounting: what was read, what was kept, what was skipped and why.

Every reader reports each row it reads to a :class:`SkipCounter`: ``good`` or ``skip(reason, ...)``,
so ``good + skipped == read`` always holds. Counters from DataLoader workers travel back inside the
batches (:meth:`SkipCounter.to_dict`) and are merged in the training process (:meth:`merge`).
``strict=True`` turns the first bad sample into a :class:`DataError` that names the file and row.
Inside a DataLoader worker the readers return :func:`error_marker` items instead of raising (torch
re-raises a worker's exception as ``type(exc)(traceback text)``, which DataError's signature refuses);
the loaders in the training process call :func:`raise_marker` on every item.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mmembed.images import ImageError
from mmembed.video import VIDEO_ERROR_KINDS, VideoError

__all__ = [
    "DataError",
    "BadSample",
    "SkipCounter",
    "image_reason",
    "video_reason",
    "VIDEO_REASONS",
    "error_marker",
    "raise_marker",
]

#: skip categories of bad videos, one per :data:`mmembed.video.VIDEO_ERROR_KINDS` (``video_missing``, ...)
VIDEO_REASONS = tuple(f"video_{k}" for k in VIDEO_ERROR_KINDS)


class DataError(ValueError):
    """A bad sample in strict mode, or a problem that makes a whole data source unusable.

    ``source`` is ``file:row`` (or just the file), ``reason`` a short category such as
    ``image_missing``, ``detail`` the human-readable explanation.
    """

    def __init__(self, source: str, reason: str, detail: str) -> None:
        self.source, self.reason, self.detail = source, reason, detail
        super().__init__(f"{source}: {detail} [{reason}]")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # The default rebuilds from ``self.args`` (one message string), which __init__ cannot take: a
        # DataError pickled across processes (multiprocessing, DataLoader workers) would fail to unpickle.
        return (type(self), (self.source, self.reason, self.detail))


def error_marker(err: DataError) -> dict[str, str]:
    """``{"source", "reason", "detail"}`` of a DataError: what a DataLoader worker sends instead of raising."""
    return {"source": err.source, "reason": err.reason, "detail": err.detail}


def raise_marker(item: Any) -> None:
    """Raise the :class:`DataError` carried by a worker's item (``item["data_error"]``); no-op otherwise."""
    if isinstance(item, dict) and isinstance(item.get("data_error"), dict):
        m = item["data_error"]
        raise DataError(str(m["source"]), str(m["reason"]), str(m["detail"]))


class BadSample(Exception):
    """Raised by a row parser or image decoder for one unusable sample (caught by the reader)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{detail} [{reason}]")


def image_reason(err: ImageError) -> str:
    """Map an :class:`ImageError` from ``load_image`` to a skip category."""
    r = err.reason.lower()
    if "not found" in r:
        return "image_missing"
    if "empty" in r:
        return "image_empty"
    if "pixel limit" in r:
        return "image_too_large"
    if "aspect ratio" in r:
        return "image_bad_aspect"
    if "not a recognised" in r:
        return "image_not_an_image"
    return "image_corrupt"


def video_reason(err: VideoError) -> str:
    """Map a :class:`~mmembed.video.VideoError` from ``load_video`` to a skip category (``video_<kind>``)."""
    return f"video_{err.kind}"


@dataclass
class SkipCounter:
    """Counts per reason plus the first ``keep_examples`` bad samples with their source.

    Attributes:
        read: samples (rows, shard entries) read.
        good: samples that were usable.
        skipped: reason -> count of skipped samples; ``sum(skipped.values()) + good == read``.
        events: reason -> count of problems not tied to one sample (``truncated_shard``,
            ``text_truncated`` for kept samples whose text was cut).
        examples: the first few ``{"source", "reason", "detail"}`` records.
    """

    strict: bool = False
    keep_examples: int = 10
    read: int = 0
    good: int = 0
    skipped: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def ok(self) -> None:
        """One usable sample was read."""
        self.read += 1
        self.good += 1

    def skip(self, source: str, reason: str, detail: str) -> None:
        """One sample was read and is unusable. Raises :class:`DataError` in strict mode."""
        self.read += 1
        self.skipped[reason] += 1
        self._example(source, reason, detail)
        if self.strict:
            raise DataError(source, reason, detail)

    def reclassify(self, source: str, reason: str, detail: str) -> None:
        """A sample counted as good turned out unusable later (e.g. the processor rejected it)."""
        self.good -= 1
        self.read -= 1
        self.skip(source, reason, detail)

    def event(self, source: str, reason: str, detail: str, fatal_in_strict: bool = True) -> None:
        """A problem not tied to one sample (a truncated shard, a cut text)."""
        self.events[reason] += 1
        self._example(source, reason, detail)
        if self.strict and fatal_in_strict:
            raise DataError(source, reason, detail)

    def _example(self, source: str, reason: str, detail: str) -> None:
        if len(self.examples) < self.keep_examples:
            self.examples.append({"source": source, "reason": reason, "detail": detail})

    def merge(self, other: SkipCounter | dict[str, Any]) -> SkipCounter:
        """Add another counter (or its :meth:`to_dict`) into this one; returns self."""
        o = other if isinstance(other, SkipCounter) else SkipCounter.from_dict(other)
        self.read += o.read
        self.good += o.good
        self.skipped.update(o.skipped)
        self.events.update(o.events)
        room = self.keep_examples - len(self.examples)
        if room > 0:
            self.examples.extend(o.examples[:room])
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "good": self.good,
            "skipped": dict(self.skipped),
            "events": dict(self.events),
            "examples": list(self.examples),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkipCounter:
        return cls(
            read=int(d.get("read", 0)),
            good=int(d.get("good", 0)),
            skipped=Counter(d.get("skipped", {})),
            events=Counter(d.get("events", {})),
            examples=list(d.get("examples", [])),
        )

    def reset(self) -> None:
        self.read = self.good = 0
        self.skipped.clear()
        self.events.clear()
        self.examples.clear()

    def summary(self) -> str:
        """A few lines for the end-of-epoch / end-of-training report."""
        lines = [f"read {self.read}, good {self.good}, skipped {self.num_skipped}"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {reason}: {n}")
        for reason, n in sorted(self.events.items()):
            lines.append(f"  {reason}: {n}")
        for ex in self.examples:
            lines.append(f"  e.g. {ex['source']}: {ex['detail']} [{ex['reason']}]")
        return "\n".join(lines)

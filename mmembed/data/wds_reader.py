"""The raw-sample reader behind :class:`mmembed.data.wds.WdsStream`: shards in each epoch's order, the seeded
shuffle buffer, and a position that resumes without reading the consumed samples again (docs/data.md,
"Resuming a stream").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from mmembed.data.skips import DataError, SkipCounter

if TYPE_CHECKING:
    from mmembed.data.wds import WdsStream

INDEX_NAME = "shards.json"


def _check_shard(shard: str, got: int, expected: int | None, error: Exception | None, counter: SkipCounter) -> None:
    """Count one ``truncated_shard`` event (fatal in strict mode) for a shard read to its end that came up short.

    A tar error is one sign. The other is the count in ``shards.json``: a cut at a 512-byte tar header
    boundary reads like a clean end of the archive (Python's ``tarfile`` stops without an error on an
    empty or partial header after the first member), so only the count shows the samples that are gone.
    """
    if error is not None:
        of = f" of {expected}" if expected is not None else ""
        counter.event(shard, "truncated_shard", f"unreadable shard data after {got}{of} samples: {error}")
    elif expected is not None and got < expected:
        counter.event(
            shard, "truncated_shard", f"read {got} of {expected} samples ({INDEX_NAME}): the shard ends early"
        )


Loc = tuple[int, int, int]  # (epoch, shard number in that epoch's order for the stream, sample number in the shard)


def _shard_samples(shard: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    return wds.tariterators.tarfile_samples([{"url": shard}], handler=handler)


class StreamReader:
    """The raw samples of stream ``g`` of ``total``: shards in each epoch's order, then the seeded shuffle buffer.

    The buffer does what ``webdataset.filters._shuffle(data, n, n, seed=seed * 100_003 + g)`` does, draw for draw
    (the stream before this class used it), with its state in the open: :meth:`state` after any sample and
    :meth:`restore` continue the same sequence without reading the consumed samples again.
    """

    def __init__(self, stream: WdsStream, g: int, total: int, counter: SkipCounter) -> None:
        self.stream, self.g, self.total, self.counter = stream, g, total, counter
        self.size = max(0, stream.shuffle_buffer)
        self.cursor: Loc = (0, 0, 0)  # the next input: samples before it in its shard were read
        self.done = False  # the input is exhausted (one pass only)
        self.buf: list[tuple[Loc, dict[str, Any]]] = []
        self.rng = random.Random(stream.seed * 100_003 + g)
        self.drop = 0  # older positions: raw inputs to drop (no buffer) ...
        self.replay = 0  # ... or outputs of the buffer to draw and drop

    def layout(self) -> list[Any]:
        s = self.stream
        return [self.size, bool(s.shardshuffle), bool(s.resample), len(s.shards), self.g, self.total]

    def state(self) -> dict[str, Any]:
        """JSON-able position after the last sample handed out (see :meth:`restore`)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "layout": self.layout(),
            "cursor": list(self.cursor),
            "done": self.done,
            "buffer": [x for loc, _ in self.buf for x in loc],
            "rng": [version, list(internal), gauss] if self.size else None,
        }

    def restore(self, state: dict[str, Any]) -> bool:
        """Continue from :meth:`state`; False (nothing changed) when it was saved for another buffer or shard layout.

        Raises:
            DataError: (``resume_mismatch``) a buffered sample is no longer in its shard.
        """
        if state.get("layout") != self.layout() or "cursor" not in state:
            return False
        e, j, k = (int(x) for x in state["cursor"])
        self.cursor, self.done = (e, j, k), bool(state["done"])
        flat = [int(x) for x in state["buffer"]]
        self.buf = self._refill([(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)])
        if self.size:
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        return True

    def skip_raw(self, n: int) -> None:
        """An older position (raw samples consumed, nothing else): skip them as the stream always did."""
        if self.size:
            self.replay = n
        else:
            self.drop = n

    def _refill(self, locs: list[Loc]) -> list[tuple[Loc, dict[str, Any]]]:
        """The buffered samples read back: each shard that holds some, up to the last one needed."""
        wanted: dict[tuple[int, int], set[int]] = {}
        for e, j, k in locs:
            wanted.setdefault((e, j), set()).add(k)
        got: dict[Loc, dict[str, Any]] = {}
        for (e, j), ks in wanted.items():
            shard = self.stream._epoch_shards(e, self.g, self.total)[j]
            last = max(ks)
            for k, raw in enumerate(_shard_samples(shard, lambda exn: True)):
                if k in ks:
                    got[(e, j, k)] = raw
                if k >= last:
                    break
            missing = sorted(k for k in ks if (e, j, k) not in got)
            if missing:
                raise DataError(shard, "resume_mismatch", f"sample {missing[0]}, buffered at the save, is gone")
        return [(loc, got[loc]) for loc in locs]

    def _input(self) -> Iterator[tuple[Loc, dict[str, Any]]]:
        """``(loc, raw)`` from the cursor on, advancing it; shard checks as the stream always made them."""
        errors: list[Exception] = []  # the first tar error of the shard being read

        def handler(exn: Exception) -> bool:  # tar errors: remember the first, go on with the next shard
            if not errors:
                errors.append(exn)
            # Reported after the shard (below), not from here: webdataset's own ``except`` blocks around
            # this call would catch a DataError raised here, pass it to this handler again and go on.
            return True

        e, j, k = self.cursor
        while not self.done:
            if e > 0 and not self.stream.resample:
                self.done = True
                return
            shards = self.stream._epoch_shards(e, self.g, self.total)
            while j < len(shards):
                shard = shards[j]
                n = self.stream.shard_counts.get(shard)
                if k == 0 and n is not None and self.drop >= n:  # skip a whole shard without opening it
                    self.drop -= n
                else:
                    errors.clear()
                    got = 0  # samples of this shard, the ones skipped on resume included
                    for raw in _shard_samples(shard, handler):
                        got += 1
                        if got <= k:  # read before the saved position
                            continue
                        self.cursor = (e, j, got)
                        if self.drop > 0:
                            self.drop -= 1
                            continue
                        yield (e, j, got - 1), raw
                    _check_shard(shard, got, n, errors[0] if errors else None, self.counter)
                j, k = j + 1, 0
                self.cursor = (e, j, 0)
            e, j = e + 1, 0
            self.cursor = (e, 0, 0)

    def _shuffled(self) -> Iterator[dict[str, Any]]:
        from webdataset.filters import pick

        data = self._input()
        if not self.size:
            for _, raw in data:
                yield raw
            return
        buf, rng = self.buf, self.rng
        for item in data:  # webdataset's _shuffle with initial == bufsize
            buf.append(item)
            if len(buf) < self.size:
                try:
                    buf.append(next(data))
                except StopIteration:
                    pass
            if len(buf) >= self.size:
                yield pick(buf, rng)[1]
        while buf:
            yield pick(buf, rng)[1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = self._shuffled()
        for _ in range(self.replay):  # an older position: replay through the buffer so its state matches
            if next(it, None) is None:
                return
        yield from it

"""Webdataset shards: the sample layout, and a deterministic, resumable streaming reader.

Layout (written by ``tools/convert_to_wds.py``): one tar entry group per sample, key ``%09d``;
``<key>.json`` holds ``{"query": SIDE, "positive": SIDE, "negatives": [SIDE], "dataset", "source",
"meta"}`` with SIDE = ``{"instruction", "text", "images": ["q0.jpg", ...]}``; each image is stored as
its original encoded bytes under ``<key>.<name>`` (``q0``, ``p0``, ``n<j>_<i>`` + file extension).
Texts keep MMEB's ``<|image_1|>``; the reader swaps in the backbone's placeholder. ``shards.json``
beside the shards lists each shard's sample count.

Reader (:class:`WdsStream`): the shard list is split over ``world_size * num_workers`` streams
(stream ``g = rank * num_workers + worker`` takes shards ``g, g + T, ...`` of each epoch's order),
so no two streams share a shard; ``shardshuffle`` permutes the order per epoch from the seed,
``shuffle_buffer`` shuffles samples with a seeded buffer, ``resample=True`` repeats epochs forever.
Everything is a function of (seed, rank, world, workers). A stream's position is its input cursor
(epoch, shard number in that epoch's order, samples read from that shard), the shuffle generator's state and
the cursors of the samples waiting in the buffer; each batch carries it. Resuming opens the cursor's shard
directly (earlier shards are never opened), reads the buffered samples back from the few shards that hold them,
and restores the generator: the stream goes on exactly as the uninterrupted one, at a cost bounded by the buffer
and the shard size, not by the samples consumed (docs/data.md, "Resuming a stream"). A position that only has
the raw count (a checkpoint from before) skips that many samples as before (whole shards by ``shards.json``
without a buffer; through the buffer with one). :class:`WdsLoader` records the positions from the batches it
hands out and rotates worker ids on resume so the batch order continues exactly. A truncated shard (a tar
error, or fewer samples than ``shards.json`` lists: a cut at a tar header boundary reads like a clean end)
is counted (``truncated_shard``, fatal in strict mode) and the stream moves on to the next shard. A
:class:`DataError` in a DataLoader worker travels to the training process as a ``{"data_error": ...}`` item
and is raised there by :class:`WdsLoader` (torch cannot rebuild a DataError itself).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmembed.data.collate import collate_problem
from mmembed.data.dataset import decode_sample
from mmembed.data.formats import content_key, convert_text
from mmembed.data.sample import Sample, Side
from mmembed.data.skips import BadSample, DataError, SkipCounter, error_marker, raise_marker
from mmembed.data.wds_reader import INDEX_NAME, StreamReader
from mmembed.images import DEFAULT_MAX_PIXELS

__all__ = ["WdsStream", "WdsLoader", "list_shards", "sample_from_wds", "side_to_json"]


def list_shards(spec: str | Path) -> tuple[list[str], dict[str, int]]:
    """Shards of a directory (``*.tar`` sorted), a ``shards.json`` or one ``.tar`` -> (paths, counts)."""
    p = Path(spec)
    index = p / INDEX_NAME if p.is_dir() else (p if p.name == INDEX_NAME else None)
    counts: dict[str, int] = {}
    if index is not None and index.is_file():
        meta = json.loads(index.read_text())
        shards = [str(index.parent / s["name"]) for s in meta["shards"]]
        counts = {str(index.parent / s["name"]): int(s["count"]) for s in meta["shards"]}
    elif p.is_dir():
        shards = sorted(str(x) for x in p.glob("*.tar"))
    elif p.suffix == ".tar" and p.is_file():
        shards = [str(p)]
    else:
        raise FileNotFoundError(f"{p}: expected a directory of .tar shards, a {INDEX_NAME} or a .tar file")
    if not shards:
        raise FileNotFoundError(f"{p}: no .tar shards found")
    return shards, counts


def side_to_json(side: Side, names: list[str]) -> dict[str, Any]:
    return {"instruction": side.instruction, "text": side.text, "images": names}


def sample_from_wds(raw: dict[str, Any], placeholder: str) -> Sample:
    """A grouped tar entry (``{"__key__", "json", "q0.jpg", ...}``) -> Sample with image bytes."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    if "json" not in raw:
        raise BadSample("missing_field", f"{where}: no .json entry in the sample")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample("bad_json", f"{where}: .json entry is not valid JSON: {e}") from None

    def side(d: Any, what: str) -> Side:
        if not isinstance(d, dict):
            raise BadSample("bad_field", f"{where}: '{what}' must be an object")
        images = []
        for name in d.get("images") or []:
            if name not in raw:
                raise BadSample("image_missing", f"{where}: image entry '{name}' of {what} is missing")
            images.append(raw[name])
        text = convert_text(d.get("text"), bool(images), placeholder)
        s = Side(instruction=d.get("instruction"), text=text, images=images)
        if s.is_empty():
            raise BadSample("empty_text", f"{where}: {what} has neither text nor an image")
        return s

    if not isinstance(meta, dict) or "query" not in meta or "positive" not in meta:
        raise BadSample("missing_field", f"{where}: .json needs 'query' and 'positive'")
    negs = meta.get("negatives") or []
    sample = Sample(
        query=side(meta["query"], "query"),
        positive=side(meta["positive"], "positive"),
        negatives=[side(n, f"negatives[{j}]") for j, n in enumerate(negs)],
        dataset=str(meta.get("dataset", "")),
        source=str(meta.get("source") or where),
        meta=dict(meta.get("meta") or {}),
    )
    if len(sample.meta.get("target_keys") or []) != 1 + len(sample.negatives):  # not written by the converter
        sample.meta["target_keys"] = [content_key(t) for t in (sample.positive, *sample.negatives)]
    return sample


class WdsStream(torch.utils.data.IterableDataset):
    """Per-rank batches from tar shards; see the module docstring for the split and resume rules.

    Args:
        shards: shard paths (``list_shards``); ``shard_counts`` their sample counts (optional).
        batch_size: samples per batch on this rank.
        rank, world_size: this process in the job.
        seed: shard order, sample shuffle.
        shuffle_buffer: 0 keeps the shard order of samples.
        shardshuffle: permute the shard order each epoch.
        resample: endless epochs (False: one pass; the last partial batch is yielded).
        collate: runs in the worker on the list of decoded samples.
    Attributes set by :class:`WdsLoader` before iterating: ``resume`` ``{stream id: position}`` (the batches'
    ``"position"``), else ``start`` ``{stream id: raw samples to skip}`` (an older checkpoint).
    """

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        shardshuffle: bool = True,
        resample: bool = False,
        collate: Callable[[list[Sample]], dict[str, Any]] | None = None,
        placeholder: str = "<image>",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
        shard_counts: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.batch_size, self.rank, self.world_size = list(shards), batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.shardshuffle, self.resample = seed, shuffle_buffer, shardshuffle, resample
        self.collate, self.placeholder, self.max_pixels, self.strict = collate, placeholder, max_pixels, strict
        self.shard_counts = shard_counts or {}
        self.start: dict[int, int] = {}
        self.resume: dict[int, dict[str, Any]] = {}  # {stream id: StreamReader.state()}, preferred to ``start``
        self.rotation = 0  # worker w serves stream (w + rotation) % num_workers

    def check_split(self, num_workers: int) -> None:
        total = self.world_size * max(1, num_workers)
        if len(self.shards) < total:
            raise ValueError(
                f"{len(self.shards)} shards cannot be split over {self.world_size} ranks x {num_workers} workers "
                f"= {total} streams without overlap; write at least {total} shards (convert_to_wds --shard-size)"
            )

    def _epoch_shards(self, epoch: int, g: int, total: int) -> list[str]:
        order = list(self.shards)
        if self.shardshuffle:
            perm = np.random.default_rng([self.seed, epoch, 0x736872]).permutation(len(order))
            order = [order[j] for j in perm]
        return order[g::total]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if torch.utils.data.get_worker_info() is None:
            yield from self._batches()
            return
        try:
            yield from self._batches()
        except DataError as e:
            # In a DataLoader worker torch re-raises as ``DataError(traceback text)``, which DataError's
            # 3-argument __init__ refuses, so the main process would get a RuntimeError. A marker item crosses
            # the process boundary instead; WdsLoader raises the real DataError from it.
            yield {"data_error": error_marker(e)}

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        nw, w = (info.num_workers, info.id) if info is not None else (1, 0)
        sid = (w + self.rotation) % nw
        g, total = self.rank * nw + sid, self.world_size * nw
        self.check_split(nw)
        pos = self.start.get(sid, 0)
        counter = SkipCounter(strict=self.strict)
        reader = StreamReader(self, g, total, counter)
        state = self.resume.get(sid)
        if state is not None and reader.restore(state):
            pos = int(state["raw"])
        else:
            reader.skip_raw(pos)
        batch: list[Sample] = []
        for raw in reader:
            pos += 1
            try:
                sample = decode_sample(sample_from_wds(raw, self.placeholder), self.max_pixels)
            except BadSample as e:
                counter.skip(f"{raw.get('__url__')}:{raw.get('__key__')}", e.reason, e.detail)
                continue
            counter.ok()
            batch.append(sample)
            if len(batch) >= self.batch_size:
                out = self._collate(batch, counter)
                if out is None:  # the processor rejected some samples: they were removed, keep filling
                    continue
                yield self._emit(out, counter, sid, pos, reader)
                batch = []
                counter.reset()  # the same object: the shard-error handler holds it
        out = None
        while batch and out is None:
            out = self._collate(batch, counter)
        if out is not None or counter.read or counter.events:
            yield self._emit(out or {"samples": []}, counter, sid, pos, reader)

    def _collate(self, batch: list[Sample], counter: SkipCounter) -> dict[str, Any] | None:
        """Collated batch, or None after removing (and counting) the samples the processor rejects."""
        if self.collate is None:
            return {"samples": list(batch)}
        try:
            return self.collate(batch)
        except DataError:
            raise
        except Exception as error:
            bad = [(s, p) for s in batch if (p := collate_problem(self.collate, s)) is not None]
            if not bad:
                raise error
            rejected = {id(s) for s, _ in bad}
            batch[:] = [s for s in batch if id(s) not in rejected]
            for s, problem in bad:
                counter.reclassify(s.source, "processor_error", problem)
            return None

    def _emit(
        self, out: dict[str, Any], counter: SkipCounter, sid: int, pos: int, reader: StreamReader
    ) -> dict[str, Any]:
        out["position"] = {"stream": sid, "raw": pos, **reader.state()}
        out["skips"] = counter.to_dict()
        return out


class WdsLoader:
    """A DataLoader over :class:`WdsStream` that tracks each stream's position for checkpoints.

    Yields the batch dicts with ``"step"`` (batches handed out so far; an empty trailing
    ``{"samples": []}`` that only carries skip counts is absorbed), up to ``max_steps`` batches.
    ``state_dict()`` -> ``{"kind": "wds", "raw": {stream: n}, "streams": {stream: position}, "batches": n, ...}``;
    ``load_state_dict`` before iterating resumes without replaying or skipping samples (same seed,
    world size and ``num_workers`` required; checked).
    """

    def __init__(self, stream: WdsStream, num_workers: int = 0, max_steps: int | None = None, **loader_kw: Any) -> None:
        self.stream, self.num_workers, self.max_steps, self.loader_kw = stream, num_workers, max_steps, loader_kw
        self.raw: dict[int, int] = {}
        self.positions: dict[int, dict[str, Any]] = {}
        self.batches = 0
        self.skips = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        nw = max(1, self.num_workers)
        self.stream.check_split(nw)  # fail here, not inside a worker
        self.stream.start = dict(self.raw)
        self.stream.resume = dict(self.positions)
        self.stream.rotation = self.batches % nw
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity, **self.loader_kw
        )
        if self.max_steps is not None and self.batches >= self.max_steps:
            return
        for batch in loader:
            raise_marker(batch)  # a DataError in a worker (strict mode, a truncated shard)
            self.skips.merge(batch["skips"])
            pos = batch["position"]
            self.raw[pos["stream"]] = pos["raw"]
            self.positions[pos["stream"]] = {k: v for k, v in pos.items() if k != "stream"}
            if "samples" in batch and not batch["samples"]:
                continue
            batch["step"] = self.batches
            self.batches += 1
            yield batch
            if self.max_steps is not None and self.batches >= self.max_steps:
                return

    def state_dict(self) -> dict[str, Any]:
        s = self.stream
        return {
            "kind": "wds",
            "raw": {str(k): v for k, v in self.raw.items()},
            "streams": {str(k): v for k, v in self.positions.items()},
            "batches": self.batches,
            "seed": s.seed,
            "world_size": s.world_size,
            "num_workers": max(1, self.num_workers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.stream
        for key, mine in (
            ("kind", "wds"),
            ("seed", s.seed),
            ("world_size", s.world_size),
            ("num_workers", max(1, self.num_workers)),
        ):
            if state.get(key) != mine:
                raise DataError(
                    "data position", "resume_mismatch", f"{key} is {state.get(key)!r} in the checkpoint, {mine!r} now"
                )
        self.raw = {int(k): int(v) for k, v in state["raw"].items()}
        # a position whose raw count was changed by hand (or is missing) is not the one that was saved
        streams = {int(k): v for k, v in (state.get("streams") or {}).items()}
        self.positions = {k: v for k, v in streams.items() if int(v.get("raw", -1)) == self.raw.get(k)}
        self.batches = int(state["batches"])


def _identity(x: Any) -> Any:
    return x

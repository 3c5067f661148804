"""The plan of one eval set in arrays: a de-duplicated input table and queries/candidates as int32 indices into it.

Layout (``N`` rows, ``P`` = query x candidate pairs, ``U`` distinct inputs):

- ``sides`` (U): the distinct inputs, first-seen order (query of row 0, its candidates, row 1, ...); the evaluator
  encodes each once into a (U, D) embedding table;
- ``query_idx`` (N,) int32: the row's query in the table;
- ``cand_flat`` (P,) int32 and ``cand_offsets`` (N+1,) int64: row ``r``'s candidates are
  ``cand_flat[cand_offsets[r]:cand_offsets[r + 1]]`` (CSR layout; the positive at ``positive[r]``);
- ``missing`` (U,) / ``missing_rows`` (N,) bool: inputs with a missing image file, rows using one.

Memory is proportional to U (the inputs) plus P int32 indices. Identity of an input is its content
(:func:`side_key`: instruction, text, image references; bytes and arrays by a blake2b digest). That key is computed
once per distinct input: each pair is first looked up by a cheap raw key (the fields themselves, or the object id
of an unhashable image), and only a raw key not seen before is reduced to its content key, so two raw spellings of
one content (``Path("a.png")`` and ``"a.png"``) still share a row. The fingerprint (the cache folder's name) hashes
the content keys once each and the index arrays as bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from mmembed import dist
from mmembed.data.eval_table import EvalRows
from mmembed.data.formats import EvalExample
from mmembed.data.sample import Side

__all__ = ["side_key", "Plan", "plan_dataset", "PLAN_VERSION"]

#: hashed into every fingerprint; bump when the layout or what identifies an input changes (caches re-encode once)
PLAN_VERSION = b"mmembed-eval-plan/2"


def side_key(side: Side) -> tuple:
    """Content identity of an input: instruction, text and image references."""
    imgs = tuple(_image_id(i) for i in side.images)
    return (side.instruction or "", side.text or "", imgs)


def _image_id(im: Any) -> str:
    if isinstance(im, (str, os.PathLike)):
        return str(im)
    if isinstance(im, (bytes, bytearray)):
        return "bytes:" + hashlib.blake2b(bytes(im), digest_size=12).hexdigest()
    return "array:" + hashlib.blake2b(np.asarray(im).tobytes(), digest_size=12).hexdigest()


def _raw_key(side: Side) -> tuple:
    """A hashable stand-in for ``side``'s fields: unhashable images (decoded images, arrays) by object id."""
    imgs = (im if isinstance(im, (str, bytes, os.PathLike)) else ("#id", id(im)) for im in side.images)
    return (side.instruction, side.text, *imgs)


@dataclass
class Plan:
    """The distinct inputs of one dataset and, as index arrays, how each row refers to them (module doc).

    Attributes:
        sides: the U distinct inputs, in first-seen order.
        query_idx: (N,) int32 index into ``sides`` of each row's query.
        cand_flat: (P,) int32 indices into ``sides`` of every row's candidates, row after row.
        cand_offsets: (N+1,) int64: row ``r``'s candidates are ``cand_flat[cand_offsets[r]:cand_offsets[r+1]]``.
        positive: (N,) int32 position of the positive within each row's candidates (``ex.positive``).
        missing: (U,) True where the input has a missing image file: never encoded.
        missing_rows: (N,) True where the row's query or any candidate has a missing (or, once encoded,
            unreadable) image.
        fingerprint: hash of the inputs and the index arrays (changes with the file, instructions or placeholder).
    """

    name: str
    sides: list[Side]
    query_idx: np.ndarray
    cand_flat: np.ndarray
    cand_offsets: np.ndarray
    positive: np.ndarray
    missing: np.ndarray
    missing_rows: np.ndarray
    fingerprint: str
    examples: Sequence[EvalExample] = field(default_factory=list)
    unreadable_rows: np.ndarray | None = None  # set by encode_plan: rows whose image could not be decoded
    unreadable_example: str = ""  # the first of them, "file:line: image ...: reason"

    @property
    def n_rows(self) -> int:
        return int(self.query_idx.size)

    @property
    def sizes(self) -> np.ndarray:
        """(N,) int64 number of candidates of each row."""
        return np.diff(self.cand_offsets)

    def row_cands(self, row: int) -> np.ndarray:
        """(M_row,) indices into ``sides`` of row ``row``'s candidates (a view)."""
        return self.cand_flat[self.cand_offsets[row] : self.cand_offsets[row + 1]]

    @property
    def cand_idx(self) -> list[np.ndarray]:
        """Per row, the indices of its candidates (views of ``cand_flat``; kept for callers of the older layout)."""
        return np.split(self.cand_flat, self.cand_offsets[1:-1])

    def positive_idx(self) -> np.ndarray:
        """(N,) int32 index into ``sides`` of each row's positive."""
        return self.cand_flat[self.cand_offsets[:-1] + self.positive]

    def rows_using(self, mask: np.ndarray) -> np.ndarray:
        """(N,) True where the row's query or any of its candidates is marked in the (U,) bool ``mask``."""
        per_pair = mask[self.cand_flat]
        return mask[self.query_idx] | np.logical_or.reduceat(per_pair, self.cand_offsets[:-1])


class _Interner:
    """Numbers the distinct inputs of a range of rows: raw key -> index, content key (:func:`side_key`, once per raw
    key) -> index; ``firsts[i]`` is where input ``i`` first occurs, ``(row, candidate position)`` (-1: the query)."""

    def __init__(self) -> None:
        self.raw: dict[tuple, int] = {}
        self.content: dict[tuple, int] = {}
        self.keys: list[tuple] = []
        self.firsts: list[tuple[int, int]] = []

    def _new(self, key: tuple, side: Side, where: tuple[int, int]) -> int:
        i = self.raw.get(key)
        if i is not None:  # a duplicate within the same row
            return i
        content = side_key(side)
        i = self.content.get(content)
        if i is None:
            i = self.content[content] = len(self.keys)
            self.keys.append(content)
            self.firsts.append(where)
        self.raw[key] = i
        return i

    def many(self, sides: Sequence[Side], row: int, query: bool = False) -> np.ndarray:
        """(len(sides),) int32 index of each of ``sides`` (row ``row``'s candidates, or its query); new ones added."""
        keys = [(s.instruction, s.text, *s.images) for s in sides]
        try:
            found = np.fromiter(map(self.raw.get, keys, repeat(-1)), dtype=np.int32, count=len(keys))
        except TypeError:  # an unhashable image (decoded image, array): identified by object, then by content
            keys = [_raw_key(s) for s in sides]
            found = np.fromiter(map(self.raw.get, keys, repeat(-1)), dtype=np.int32, count=len(keys))
        for j in np.flatnonzero(found < 0).tolist():
            found[j] = self._new(keys[j], sides[j], (row, -1 if query else j))
        return found


def _mark_missing(missing: np.ndarray, q: int, cands: np.ndarray, marks: Sequence[str]) -> None:
    """Flag the inputs a reader marked (``"query"``, ``"candidate J"``) as having a missing image."""
    for label in marks:
        if label == "query":
            missing[q] = True
        elif label.startswith("candidate "):
            j = label[len("candidate ") :]
            if j.isdigit() and str(int(j)) == j and int(j) < cands.size:
                missing[cands[int(j)]] = True


def _plan_rows(name: str, examples: Sequence[EvalExample], start: int, stop: int) -> dict[str, Any]:
    """Rows ``[start, stop)`` numbered locally: ``{"error", "keys", "firsts", "query", "sizes", "flat", "positive"}``.

    ``error`` is the first bad row's message (None when all are fine); indices are into the local ``keys``.
    """
    table = _Interner()
    n = stop - start
    q_idx = np.empty(n, dtype=np.int32)
    sizes = np.empty(n, dtype=np.int64)
    pos = np.empty(n, dtype=np.int32)
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int32)]
    error = None
    for r, row in enumerate(range(start, stop)):
        ex = examples[row]
        if not ex.candidates:
            error = f"{_where(name, row, ex)}: empty candidate list"
            break
        if not 0 <= ex.positive < len(ex.candidates):
            n_c = len(ex.candidates)
            error = f"{_where(name, row, ex)}: positive index {ex.positive} out of range for {n_c} candidates"
            break
        q_idx[r] = table.many([ex.query], row, query=True)[0]
        parts.append(table.many(ex.candidates, row))
        sizes[r], pos[r] = len(ex.candidates), ex.positive
    flat = np.concatenate(parts)
    out: dict[str, Any] = {"error": error, "keys": table.keys, "firsts": table.firsts, "query": q_idx}
    out.update(sizes=sizes, flat=flat, positive=pos)
    return out


def plan_dataset(name: str, examples: Sequence[EvalExample]) -> Plan:
    """De-duplicate the inputs of ``examples``; raises ValueError naming the dataset and row on bad rows.

    Collective under a process group (call it on every rank with the same rows): each rank numbers the inputs of
    its share of the rows (:func:`mmembed.dist.shard_range`), the shares' distinct content keys and index arrays
    are gathered and merged in row order, so the plan (and its fingerprint) equals the one-process plan.
    """
    if not examples:
        raise ValueError(f"eval set '{name}' is empty")
    if isinstance(examples, EvalRows):
        return _plan_table(name, examples)
    n = len(examples)
    shares = dist.all_gather_object(_plan_rows(name, examples, *dist.shard_range(n)))
    errors = [s["error"] for s in shares if s["error"]]
    if errors:
        raise ValueError(errors[0])
    content: dict[tuple, int] = {}
    sides: list[Side] = []
    h = hashlib.blake2b(PLAN_VERSION, digest_size=16)
    remaps = []
    for share in shares:  # rank order is row order: global first-seen order
        remap = np.empty(len(share["keys"]), dtype=np.int32)
        for j, (key, (row, slot)) in enumerate(zip(share["keys"], share["firsts"])):
            i = content.get(key)
            if i is None:
                i = content[key] = len(sides)
                ex = examples[row]
                sides.append(ex.query if slot < 0 else ex.candidates[slot])
                h.update(repr(key).encode())
                h.update(b"\x00")
            remap[j] = i
        remaps.append(remap)
    q_idx = np.concatenate([m[s["query"]] for m, s in zip(remaps, shares)])
    flat = np.concatenate([m[s["flat"]] for m, s in zip(remaps, shares)])
    sizes = np.concatenate([s["sizes"] for s in shares])
    pos = np.concatenate([s["positive"] for s in shares])
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    metas = [ex.meta for ex in examples]
    return _finish(name, examples, metas, sides, h, q_idx, flat, offsets, pos)


def _plan_table(name: str, rows: EvalRows) -> Plan:
    """The plan of a table read by :func:`mmembed.data.read_eval_set`: its K inputs reduced to their content keys
    (:func:`side_key`, once each) and its index arrays remapped, with no per-pair Python and no gather (every rank
    holds the table). Inputs are numbered in the table's first-seen order, so this equals the row-walking plan."""
    sizes = np.diff(rows.cand_offsets)
    if sizes.size and sizes.min() < 1:
        row = int(np.argmin(sizes))
        raise ValueError(f"{_where(name, row, rows[row])}: empty candidate list")
    content: dict[tuple, int] = {}
    sides: list[Side] = []
    h = hashlib.blake2b(PLAN_VERSION, digest_size=16)
    remap = np.empty(len(rows.sides), dtype=np.int32)
    for j, side in enumerate(rows.sides):
        key = side_key(side)
        i = content.get(key)
        if i is None:
            i = content[key] = len(sides)
            sides.append(side)
            h.update(repr(key).encode())
            h.update(b"\x00")
        remap[j] = i
    q_idx, flat = remap[rows.query], remap[rows.cand_flat]
    return _finish(name, rows, rows.metas, sides, h, q_idx, flat, rows.cand_offsets, rows.positive)


def _finish(
    name: str,
    examples: Sequence[EvalExample],
    metas: Sequence[dict[str, Any]],
    sides: list[Side],
    h: Any,
    q_idx: np.ndarray,
    flat: np.ndarray,
    offsets: np.ndarray,
    pos: np.ndarray,
) -> Plan:
    """The plan from the merged arrays: missing-image marks from the rows' ``metas`` (N), the fingerprint ``h``
    (content keys hashed so far) completed with the index arrays as bytes."""
    n = q_idx.size
    miss_rows = np.fromiter((bool(m.get("missing_images")) for m in metas), dtype=bool, count=n)
    missing = np.zeros(len(sides), dtype=bool)
    for row in np.flatnonzero(miss_rows).tolist():
        cands = flat[offsets[row] : offsets[row + 1]]
        _mark_missing(missing, int(q_idx[row]), cands, metas[row]["missing_images"])
    for arr in (q_idx, np.diff(offsets), flat, pos):
        h.update(np.ascontiguousarray(arr, dtype="<i8" if arr.dtype == np.int64 else "<i4").tobytes())
    return Plan(
        name=name,
        sides=sides,
        query_idx=q_idx,
        cand_flat=flat,
        cand_offsets=offsets,
        positive=pos,
        missing=missing,
        missing_rows=miss_rows,
        fingerprint=h.hexdigest(),
        examples=examples,
    )


def _where(name: str, row: int, ex: EvalExample) -> str:
    return f"eval set '{name}', row {row}" + (f" ({ex.source})" if ex.source else "")

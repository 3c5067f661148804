"""An eval set read into a table: its distinct inputs once, the rows as int32 index arrays into them.

:func:`mmembed.data.read_eval_set` builds one :class:`EvalRows` per dataset. With ``N`` rows, ``P`` query x
candidate pairs and ``K`` inputs:

- ``sides`` (K): the inputs in first-seen order (query of row 0, its new candidates, query of row 1, ...);
- ``query`` (N,) int32, ``cand_flat`` (P,) int32, ``cand_offsets`` (N+1,) int64 (CSR: row ``r``'s candidates
  are ``cand_flat[cand_offsets[r]:cand_offsets[r + 1]]``), ``positive`` (N,) int32 (0 in MMEB files);
- ``sources``, ``metas`` (N): ``file:line`` and the row's meta (``text_truncated``, ``missing_images``...).

A candidate is built once per distinct raw ``(text, image path)`` of a file and row context
(:class:`mmembed.data.formats.EvalRowParts`): a label set shared by every row of a classification file is parsed,
checked on disk and stored once, and each row adds only its query and P int32 indices. (Every query gets its
own entry; equal contents under different raw spellings are merged by the evaluator's plan,
:func:`mmembed.eval.plan.plan_dataset`, which reads these arrays directly.) Rows are still a
``Sequence[EvalExample]``: ``rows[i]`` builds the example from the table (sharing its :class:`Side` objects).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import repeat
from pathlib import Path
from typing import Any, overload

import numpy as np

from mmembed.data.formats import EvalExample, ParseOptions, candidate_key, eval_row_parts
from mmembed.data.sample import Side
from mmembed.data.skips import BadSample

__all__ = ["EvalRows", "EvalRowsBuilder", "image_problem"]


def image_problem(side: Side) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first image file of ``side`` that is absent or empty, else None."""
    for im in side.images:
        if isinstance(im, (str, os.PathLike)):
            p = Path(im)
            if not p.is_file():
                return "image_missing", f"{p}: file not found"
            if p.stat().st_size == 0:
                return "image_empty", f"{p}: empty file (0 bytes)"
    return None


class EvalRows(Sequence[EvalExample]):
    """The rows of one eval set as index arrays into its inputs (module doc); ``rows[i]`` is an :class:`EvalExample`.

    Attributes:
        dataset: the dataset's name.
        sides: the K inputs; ``keys``: their ``candidate_keys`` entries (K,) (``""`` for queries).
        query: (N,) int32; cand_flat: (P,) int32; cand_offsets: (N+1,) int64; positive: (N,) int32.
        sources: (N) ``file:line`` of each row; metas: (N) each row's meta dict.
    """

    def __init__(
        self,
        dataset: str,
        sides: list[Side],
        keys: list[str],
        query: np.ndarray,
        cand_flat: np.ndarray,
        cand_offsets: np.ndarray,
        sources: list[str],
        metas: list[dict[str, Any]],
    ) -> None:
        self.dataset, self.sides, self.keys = dataset, sides, keys
        self.query, self.cand_flat, self.cand_offsets = query, cand_flat, cand_offsets
        self.positive = np.zeros(query.size, dtype=np.int32)
        self.sources, self.metas = sources, metas

    def __len__(self) -> int:
        return int(self.query.size)

    @overload
    def __getitem__(self, i: int) -> EvalExample: ...

    @overload
    def __getitem__(self, i: slice) -> list[EvalExample]: ...

    def __getitem__(self, i: int | slice) -> EvalExample | list[EvalExample]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        r = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= r < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        ids = self.cand_flat[self.cand_offsets[r] : self.cand_offsets[r + 1]].tolist()
        return EvalExample(
            query=self.sides[int(self.query[r])],
            candidates=[self.sides[k] for k in ids],
            dataset=self.dataset,
            source=self.sources[r],
            candidate_keys=[self.keys[k] for k in ids],
            meta=self.metas[r],
            positive=int(self.positive[r]),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (EvalRows, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EvalRows({self.dataset!r}, {len(self)} rows, {self.cand_flat.size} pairs, {len(self.sides)} inputs)"

    def rows_using(self, mask: np.ndarray) -> np.ndarray:
        """(N,) True where the row's query or any of its candidates is marked in the (K,) bool ``mask``."""
        starts = self.cand_offsets[:-1]
        per_row = np.logical_or.reduceat(mask[self.cand_flat], starts) if self.cand_flat.size else np.zeros(0, bool)
        return mask[self.query] | (per_row & (np.diff(self.cand_offsets) > 0))


class EvalRowsBuilder:
    """Adds the rows of one dataset's files to a table (:class:`EvalRows`), building each candidate once.

    Call :meth:`new_file` before the rows of each file (the raw-field memo is per file: options differ), then
    :meth:`add_row` per file row (or :meth:`add_example` for a row already parsed and changed, e.g. by manifest
    instructions), and :meth:`finish`. A row that raises adds nothing.

    Args:
        check: ``"skip"`` (a missing or empty image file raises :class:`BadSample`), ``"mark"`` (the row is kept
            with ``meta["missing_images"]``) or ``None`` (no check).
    """

    def __init__(self, dataset: str, check: str | None = None) -> None:
        self.dataset, self.check = dataset, check
        self.sides: list[Side] = []
        self.keys: list[str] = []
        self._problem: dict[int, tuple[str, str]] = {}  # input -> its image problem (only inputs that have one)
        self._bad = bytearray()  # (K,) 1 where the input has an image problem
        self._memo: dict[tuple, dict[Any, int]] = {}  # (context, has images) -> raw key -> 2 * input + text cut
        self._exact: dict[tuple, int] = {}  # for add_example: (fields, key) -> input
        self._query: list[int] = []
        self._parts: list[np.ndarray] = []
        self._sizes: list[int] = []
        self.sources: list[str] = []
        self.metas: list[dict[str, Any]] = []

    def new_file(self) -> None:
        self._memo = {}

    def _labels(self, q: int, ids: np.ndarray, extra: dict[int, tuple[str, str]]) -> list[tuple[str, tuple[str, str]]]:
        """``(label, (reason, detail))`` of the row's inputs with an image problem, in order (``"query"``,
        ``"candidate J"``); ``extra``: the problems of the inputs the row is about to add (past the table)."""
        if not (self._problem or extra):
            return []

        def problem(k: int) -> tuple[str, str] | None:
            return extra.get(k) or self._problem.get(k)

        first = problem(q)
        out = [("query", first)] if first else []
        view = np.frombuffer(self._bad, dtype=np.uint8)  # (K,) committed inputs; released before any append
        hit = np.zeros(ids.size, dtype=bool)
        old = ids < view.size
        hit[old] = view[ids[old]] > 0
        del view
        for idx in extra:
            hit |= ids == idx
        for j in np.flatnonzero(hit).tolist():
            got = problem(int(ids[j]))
            if got:
                out.append((f"candidate {j}", got))
        return out

    def add_row(self, row: dict[str, Any], fmt: str, opts: ParseOptions, source: str) -> list[tuple[str, str]]:
        """Parse one file row into the table; returns its ``(label, detail)`` image problems (``"mark"`` mode).

        Raises :class:`BadSample` for a bad row or (``"skip"`` mode) a missing image; then nothing is added.
        """
        p = eval_row_parts(row, fmt, opts)
        memo = self._memo.setdefault((p.context, p.images is None), {})
        raw: Any = p.texts if p.images is None else zip(p.texts, p.images)
        codes = np.fromiter(map(memo.get, raw, repeat(-1)), dtype=np.int64, count=len(p.texts))
        base = len(self.sides)
        new: list[tuple[Any, Side, str]] = []  # inputs this row adds after its query (index base + 1 + position)
        pending: dict[Any, int] = {}
        for j in np.flatnonzero(codes < 0).tolist():
            t = p.texts[j]
            i = p.images[j] if p.images is not None else None
            k = t if p.images is None else (t, i)
            code = pending.get(k)
            if code is None:
                side, cut = p.make(j, t, i)
                code = pending[k] = 2 * (base + 1 + len(new)) + int(cut)
                new.append((k, side, candidate_key(t, i)))
            codes[j] = code
        ids = (codes >> 1).astype(np.int32)
        cut = p.cut or bool((codes & 1).any())
        extra: dict[int, tuple[str, str]] = {}
        if self.check is not None:
            for idx, side in [(base, p.query)] + [(base + 1 + n, s) for n, (_, s, _) in enumerate(new)]:
                problem = image_problem(side) if side.images else None
                if problem:
                    extra[idx] = problem
        found = self._labels(base, ids, extra)
        if found and self.check == "skip":
            raise BadSample(*found[0][1])
        labels = [(label, problem[1]) for label, problem in found]
        memo.update((k, code) for k, code in pending.items())
        self._append(p.query, "")
        for _, side, key in new:
            self._append(side, key)
        self._problem.update(extra)
        for idx in extra:
            self._bad[idx] = 1
        meta = {"text_truncated": cut, **p.meta}
        if labels and self.check == "mark":
            meta["missing_images"] = [label for label, _ in labels]
        self._row(base, ids, source, meta)
        return labels if self.check == "mark" else []

    def check_example(self, ex: EvalExample) -> list[tuple[str, str]]:
        """Image problems of a parsed row (for :meth:`add_example`): raises in ``"skip"`` mode, else the labels."""
        if self.check is None:
            return []
        sides = [("query", ex.query)] + [(f"candidate {j}", c) for j, c in enumerate(ex.candidates)]
        found = [(label, problem) for label, side in sides if (problem := image_problem(side))]
        if found and self.check == "skip":
            raise BadSample(*found[0][1])
        return [(label, problem[1]) for label, problem in found]

    def add_example(self, ex: EvalExample, source: str) -> None:
        """Add a parsed row (its sides de-duplicated by their exact fields and candidate key)."""
        q = len(self.sides)
        self._append(ex.query, "")
        ids = np.empty(len(ex.candidates), dtype=np.int32)
        keys = ex.candidate_keys or [""] * len(ex.candidates)
        for j, (side, key) in enumerate(zip(ex.candidates, keys)):
            exact = (side.instruction, side.text, tuple(map(str, side.images)), key)
            k = self._exact.get(exact)
            if k is None:
                k = self._exact[exact] = len(self.sides)
                self._append(side, key)
            ids[j] = k
        self._row(q, ids, source, ex.meta)

    def _append(self, side: Side, key: str) -> None:
        self.sides.append(side)
        self.keys.append(key)
        self._bad.append(0)

    def _row(self, q: int, ids: np.ndarray, source: str, meta: dict[str, Any]) -> None:
        self._query.append(q)
        self._parts.append(ids)
        self._sizes.append(int(ids.size))
        self.sources.append(source)
        self.metas.append(meta)

    def finish(self) -> EvalRows:
        """The table of every row added."""
        offsets = np.zeros(len(self._sizes) + 1, dtype=np.int64)
        np.cumsum(np.asarray(self._sizes, dtype=np.int64), out=offsets[1:])
        flat = np.concatenate([np.zeros(0, dtype=np.int32), *self._parts])
        query = np.asarray(self._query, dtype=np.int32)
        return EvalRows(self.dataset, self.sides, self.keys, query, flat, offsets, self.sources, self.metas)

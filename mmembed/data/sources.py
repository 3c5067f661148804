"""Random access to the rows of parquet and JSONL files (map-style, fork-safe).

Nothing is held per row as a Python object: a large parquet file is memory-mapped from an Arrow cache file
(DataLoader workers and ranks share its pages), a small one is decoded in memory. JSONL files are indexed once
by byte offsets in a numpy array (:func:`index_lines`); each worker opens its own file handle. ``row(i)``
raises :class:`BadSample` for an invalid JSON line, so one bad line costs one sample, never the file. Errors
name a row as ``file:row N`` (parquet) or ``file:line N`` (JSONL), both 1-based, the numbers a person finds
in the file (a JSONL's blank lines count).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mmembed.data.skips import BadSample

__all__ = ["RowSource", "ParquetRows", "JsonlRows", "open_rows", "index_lines", "arrow_cache_dir", "DATA_SUFFIXES"]

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


class RowSource:
    """A file of rows: ``len(src)``, ``src.row(i) -> dict``, ``src.columns`` and ``src.path``."""

    path: Path

    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def columns(self) -> list[str]:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """``file:row N`` for error messages, ``N`` 1-based (row ``i = 0`` is ``row 1``), as JSONL's ``line N``."""
        return f"{self.path}:row {i + 1}"


class ParquetRows(RowSource):
    """Rows of a parquet file, read by index from an Arrow table.

    Parquet pages are compressed and encoded, so Arrow must decode a file before rows can be read by index; a
    decoded table costs about 250 MB per 1M MMEB-train rows, held per process. A file whose decoded size (the
    footer's ``total_byte_size``) exceeds :data:`MMAP_ABOVE_BYTES` is therefore decoded once, one row group at
    a time, into an uncompressed Arrow IPC file in the cache (:func:`arrow_cache_dir`) and memory-mapped from
    there, as Hugging Face ``datasets`` does: the process holds page-cache pages, shared by every DataLoader
    worker and rank on the machine and given back under memory pressure, not a decoded copy. The cache file is
    named by the parquet's resolved path, size and modification time, written to a temporary name and renamed
    (atomic; two ranks converting at once both produce the same file). Smaller files are decoded in memory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            meta = pq.ParquetFile(self.path).metadata
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{self.path}: cannot read parquet file: {e}") from None
        self._rows = meta.num_rows
        self._decoded = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        self._cols = list(meta.schema.to_arrow_schema().names)
        self._table = None
        self.mapped: Path | None = None  # the memory-mapped Arrow file, when one is used
        _ = self.table  # open now: a damaged file fails here, naming the file, not in a worker

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker re-opens (maps) instead of receiving a copy
        return {**self.__dict__, "_table": None}

    @property
    def table(self) -> Any:
        """The ``pyarrow.Table`` (memory-mapped when the file is large)."""
        if self._table is None:
            try:
                self._table = self._open()
            except OSError as e:
                raise ValueError(f"{self.path}: cannot read parquet file: {e}") from None
        return self._table

    def _open(self) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._decoded <= MMAP_ABOVE_BYTES:
            return pq.read_table(self.path)
        cache = arrow_cache_dir()
        st = self.path.stat()
        key = hashlib.blake2b(f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=12)
        target = cache / f"{self.path.stem}-{key.hexdigest()}.arrow"
        if not target.is_file():
            try:
                cache.mkdir(parents=True, exist_ok=True)
                _parquet_to_arrow(self.path, target)
            except PermissionError as e:  # a read-only cache: still train, at the decoded size in memory
                print(
                    f"warning: {self.path}: cannot write the Arrow cache ({e}); decoding it in memory", file=sys.stderr
                )
                return pq.read_table(self.path)
        table = pa.ipc.open_file(pa.memory_map(str(target), "r")).read_all()
        if table.num_rows != self._rows or table.column_names != self._cols:
            raise ValueError(f"{self.path}: the Arrow cache {target} does not match the file; delete it and retry")
        self.mapped = target
        return table

    def __len__(self) -> int:
        return self._rows

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    def row(self, i: int) -> dict[str, Any]:
        t = self.table
        return {c: t.column(c)[i].as_py() for c in self._cols}


MMAP_ABOVE_BYTES = 64 << 20
"""Parquet files that decode to more than this are memory-mapped from an Arrow cache (:class:`ParquetRows`)."""


def arrow_cache_dir() -> Path:
    """``$MMEMBED_CACHE/arrow``, default ``~/.cache/mmembed/arrow`` (``$XDG_CACHE_HOME`` respected)."""
    root = (
        os.environ.get("MMEMBED_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmembed"
    )
    return Path(root) / "arrow"


def _parquet_to_arrow(src: Path, target: Path, batch_rows: int = 65_536) -> None:
    """Decode ``src`` batch by batch into an uncompressed Arrow IPC file at ``target`` (temp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, pf.schema_arrow) as writer:
            for batch in pf.iter_batches(batch_size=batch_rows):
                writer.write_batch(batch)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class JsonlRows(RowSource):
    """Rows of a JSON-lines file; blank lines are ignored, a line that is not JSON is a bad sample."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.offsets, self.line_numbers = index_lines(self.path)
        self._fh = None
        self._pid = -1
        self._cols: list[str] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, -1
        return state

    def _raw(self, i: int) -> bytes:
        if self._fh is None or self._pid != os.getpid():  # one handle per process (DataLoader workers fork)
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[i]))
        return self._fh.readline()

    def line(self, i: int) -> int:
        """1-based line number of row ``i`` (blank lines count)."""
        return int(self.line_numbers[i]) if self.line_numbers is not None else i + 1

    def row(self, i: int) -> dict[str, Any]:
        raw = self._raw(i)
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("bad_json", f"line {self.line(i)} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise BadSample("bad_json", f"line {self.line(i)}: expected an object, got {type(value).__name__}")
        return value

    def where(self, i: int) -> str:
        return f"{self.path}:line {self.line(i)}"

    @property
    def columns(self) -> list[str]:
        """Field names of the first valid line (for format detection)."""
        if self._cols is None:
            self._cols = []
            for i in range(min(len(self), 100)):
                try:
                    self._cols = list(self.row(i))
                    break
                except BadSample:
                    continue
        return self._cols


_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True  # what bytes.strip() removes


def index_lines(path: Path, chunk_bytes: int = 1 << 20) -> tuple[np.ndarray, np.ndarray | None]:
    """Byte offsets (int64) of the non-blank lines of ``path`` and their 1-based line numbers (``None`` when no
    line is blank, so line = row + 1).

    Read in 1 MiB chunks with numpy, never a Python object per line: the index costs 8 bytes per row (16 once a
    line is blank), and the scan's working memory is a few chunk-sized arrays whatever the file's size; lists of
    Python ints cost about 80 MB per 1M rows.
    """
    offsets, numbers = [], []
    base, lines, start, seen_since, blanks = 0, 0, 0, False, False
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            arr = np.frombuffer(chunk, dtype=np.uint8)
            ink = ~_WHITESPACE[arr]
            ends = np.flatnonzero(arr == 10)
            if ends.size:
                seg = np.concatenate([[0], ends[:-1] + 1])
                filled = np.logical_or.reduceat(ink[: ends[-1] + 1], seg)
                filled[0] |= seen_since
                starts = seg + base
                starts[0] = start
                if filled.all():
                    offsets.append(starts)
                    if blanks:
                        numbers.append(np.arange(lines + 1, lines + 1 + ends.size))
                else:
                    if not blanks:
                        blanks = True
                        numbers = [np.arange(1, lines + 1)]  # rows so far had no blank line: row r is line r + 1
                    keep = np.flatnonzero(filled)
                    offsets.append(starts[keep])
                    numbers.append(lines + 1 + keep)
                lines += ends.size
                start, seen_since = base + int(ends[-1]) + 1, bool(ink[ends[-1] + 1 :].any())
            else:
                seen_since |= bool(ink.any())
            base += arr.size
    if seen_since:
        offsets.append(np.array([start]))
        if blanks:
            numbers.append(np.array([lines + 1]))
    off = np.concatenate(offsets).astype(np.int64, copy=False) if offsets else np.zeros(0, dtype=np.int64)
    return off, (np.concatenate(numbers).astype(np.int64, copy=False) if blanks else None)


def open_rows(path: str | os.PathLike) -> RowSource:
    """Open a ``.parquet`` or ``.jsonl``/``.json`` (JSON lines) file for random row access."""
    p = Path(path)
    if p.suffix == ".parquet":
        return ParquetRows(p)
    if p.suffix in (".jsonl", ".json"):
        return JsonlRows(p)
    raise ValueError(f"{p}: unsupported data file type {p.suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")

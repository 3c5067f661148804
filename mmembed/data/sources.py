"""Random access to the rows of parquet and JSONL files (map-style, fork-safe).

Parquet files are memory-mapped Arrow tables (nothing is copied into Python objects, so
DataLoader workers share the pages). JSONL files are indexed by byte offset once; each worker
opens its own file handle. ``row(i)`` raises :class:`BadSample` for an invalid JSON line, so one bad
line costs one sample, never the file. Errors name a row as ``file:row N`` (parquet) or ``file:line N``
(JSONL), both 1-based, the numbers a person finds in the file (a JSONL's blank lines count).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmembed.data.skips import BadSample

__all__ = ["RowSource", "ParquetRows", "JsonlRows", "open_rows", "DATA_SUFFIXES"]

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
    """Rows of a parquet file, read by index from a memory-mapped Arrow table."""

    def __init__(self, path: str | os.PathLike) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            self.table = pq.read_table(self.path, memory_map=True)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{self.path}: cannot read parquet file: {e}") from None
        self._cols = self.table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    def row(self, i: int) -> dict[str, Any]:
        return {c: self.table.column(c)[i].as_py() for c in self._cols}


class JsonlRows(RowSource):
    """Rows of a JSON-lines file; blank lines are ignored, a line that is not JSON is a bad sample."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.offsets: list[int] = []
        self.line_numbers: list[int] = []
        pos = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    self.offsets.append(pos)
                    self.line_numbers.append(lineno)
                pos += len(line)
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
        self._fh.seek(self.offsets[i])
        return self._fh.readline()

    def row(self, i: int) -> dict[str, Any]:
        raw = self._raw(i)
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("bad_json", f"line {self.line_numbers[i]} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise BadSample("bad_json", f"line {self.line_numbers[i]}: expected an object, got {type(value).__name__}")
        return value

    def where(self, i: int) -> str:
        return f"{self.path}:line {self.line_numbers[i]}"

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


def open_rows(path: str | os.PathLike) -> RowSource:
    """Open a ``.parquet`` or ``.jsonl``/``.json`` (JSON lines) file for random row access."""
    p = Path(path)
    if p.suffix == ".parquet":
        return ParquetRows(p)
    if p.suffix in (".jsonl", ".json"):
        return JsonlRows(p)
    raise ValueError(f"{p}: unsupported data file type {p.suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")

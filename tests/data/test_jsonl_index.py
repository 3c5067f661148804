"""JSONL rows are indexed by numpy byte offsets (memory flat in rows), with the line numbers a person sees."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from mmembed.data.sources import JsonlRows, index_lines


def _reference(path: Path) -> tuple[list[int], list[int]]:
    """The per-line Python loop the index replaces."""
    offsets, numbers, pos = [], [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                offsets.append(pos)
                numbers.append(lineno)
            pos += len(line)
    return offsets, numbers


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 24])
def test_the_index_equals_a_line_by_line_scan(tmp_path: Path, seed: int, chunk: int) -> None:
    rng = random.Random(seed)
    pieces = ['{"a": 1}', "", "   ", "\t", '{"b": "x y"}', " {}", "\r", '{"c": [1, 2]}\r']
    lines = [rng.choice(pieces) for _ in range(rng.randint(0, 40))]
    text = "\n".join(lines) + rng.choice(["", "\n", "\n\n", "  "])
    path = tmp_path / "f.jsonl"
    path.write_bytes(text.encode())
    off, num = index_lines(path, chunk_bytes=chunk)
    ref_off, ref_num = _reference(path)
    assert off.tolist() == ref_off
    assert (num.tolist() if num is not None else list(range(1, len(off) + 1))) == ref_num


def test_rows_errors_and_positions_read_through_the_index(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": 1}\n\n{"q": 2}\nnot json\n{"q": 3}')
    rows = JsonlRows(path)
    assert len(rows) == 4 and rows.row(0) == {"q": 1} and rows.row(1) == {"q": 2} and rows.row(3) == {"q": 3}
    assert rows.where(2) == f"{path}:line 4"
    with pytest.raises(Exception, match="line 4 is not valid JSON"):
        rows.row(2)
    assert rows.offsets.dtype == np.int64 and rows.line_numbers is not None


def test_the_index_costs_eight_bytes_a_row_without_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text("".join(f'{{"i": {i}}}\n' for i in range(100_000)))
    rows = JsonlRows(path)
    assert len(rows) == 100_000 and rows.line_numbers is None
    assert rows.offsets.nbytes == 8 * 100_000 and rows.row(99_999) == {"i": 99_999}

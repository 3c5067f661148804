"""Large parquet files are read from a memory-mapped Arrow cache: same rows, no decoded copy per process."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmembed.data import sources
from mmembed.data.dataset import SampleDataset
from mmembed.data.manifest import DatasetSpec
from mmembed.data.sources import ParquetRows, open_rows
from tests.data.data_helpers import train_row, write_parquet


@pytest.fixture
def mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every parquet file counts as large; the cache lives in the test's folder."""
    monkeypatch.setattr(sources, "MMAP_ABOVE_BYTES", 0)
    monkeypatch.setenv("MMEMBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "arrow"


def _file(tmp_path: Path, n: int = 300, name: str = "d.parquet") -> Path:
    path = tmp_path / name
    rows = [train_row(i) for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=64)  # several row groups
    return path


def test_mapped_rows_equal_the_decoded_file(tmp_path: Path, mapped: Path) -> None:
    path = _file(tmp_path)
    src = open_rows(path)
    assert isinstance(src, ParquetRows) and src.mapped is not None and src.mapped.parent == mapped
    want = pq.read_table(path).to_pylist()
    assert len(src) == len(want) and src.columns == list(want[0])
    assert [src.row(i) for i in range(len(src))] == want
    assert src.where(4) == f"{path}:row 5"


def test_the_cache_is_reused_and_follows_the_file(tmp_path: Path, mapped: Path) -> None:
    path = _file(tmp_path)
    first = open_rows(path).mapped
    made = first.stat().st_mtime_ns
    assert open_rows(path).mapped == first and first.stat().st_mtime_ns == made  # not rewritten
    write_parquet([train_row(i, neg=False) for i in range(5)], path)  # the file changes: a new cache entry
    os.utime(path, ns=(made + 10**9, made + 10**9))
    again = open_rows(path)
    assert again.mapped != first and len(again) == 5 and again.row(0)["neg_text"] == ""
    assert not list(mapped.glob(".*.tmp"))  # no temporary file left behind


def test_pickling_carries_no_table(tmp_path: Path, mapped: Path) -> None:
    path = _file(tmp_path, n=2000)
    src = open_rows(path)
    blob = pickle.dumps(src)
    assert len(blob) < 2000  # the path and the metadata, not the rows
    back = pickle.loads(blob)
    assert back.row(1999) == src.row(1999)


def test_small_files_are_decoded_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMEMBED_CACHE", str(tmp_path / "cache"))
    src = open_rows(_file(tmp_path, n=10))
    assert src.mapped is None and not (tmp_path / "cache").exists() and src.row(9)["pos_text"] == "label 9"


def test_a_read_only_cache_falls_back_with_a_warning(
    tmp_path: Path, mapped: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(src: Path, target: Path) -> None:  # what a read-only cache folder does (root ignores chmod)
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(sources, "_parquet_to_arrow", refuse)
    src = open_rows(_file(tmp_path))
    assert src.mapped is None and src.row(3) == train_row(3)
    assert "cannot write the Arrow cache" in capsys.readouterr().err


def test_a_damaged_file_names_itself(tmp_path: Path, mapped: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"bad\.parquet: cannot read parquet file"):
        open_rows(bad)


def test_forked_workers_read_the_mapped_rows(tmp_path: Path, mapped: Path) -> None:
    path = _file(tmp_path, n=40)
    ds = SampleDataset(DatasetSpec("d", [path]))
    assert ds.sources[0].mapped is not None
    loader = torch.utils.data.DataLoader(range(40), batch_size=None, num_workers=2, collate_fn=lambda i: ds.parse(i))
    got = [s.positive.text for s in loader]
    assert got == [f"label {i}" for i in range(40)]

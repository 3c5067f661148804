"""mmembed.index: FAISS index folders, exact and approximate, rows read by offset, nothing overwritten silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmembed.index import build_index, factory_string, open_index


def _data(n: int = 2000, d: int = 32, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [{"id": f"r{i}", "text": f"row {i} é", "image": None} for i in range(n)]


def _top(index, q: np.ndarray, k: int) -> list[list[str]]:
    return [[h["id"] for h in hits] for hits in index.search(q, k)]


def test_flat_is_exact_and_reads_the_right_rows(tmp_path: Path) -> None:
    x, rows = _data()
    build_index(x, rows, tmp_path / "idx", meta={"model": "m"})
    with open_index(tmp_path / "idx") as index:
        hits = index.search(x[[7, 1999]], k=3)
        assert [h[0]["id"] for h in hits] == ["r7", "r1999"] and hits[0][0]["text"] == "row 7 é"
        want = np.argsort(-(x[:5] @ x.T), axis=1, kind="stable")[:, :10]
        assert _top(index, x[:5], 10) == [[f"r{i}" for i in r] for r in want]
        assert index.meta["model"] == "m" and index.meta["kind"] == "flat" and index.count == 2000
        assert hits[0][0]["score"] == pytest.approx(1.0, abs=1e-5) and hits[0][0]["rank"] == 1


@pytest.mark.parametrize("kind,least", [("hnsw", 0.9), ("ivfpq", 0.45)])
def test_approximate_kinds_find_most_neighbours(tmp_path: Path, kind: str, least: float) -> None:
    x, rows = _data()
    q = x[:50] + 0.05 * np.random.default_rng(1).standard_normal((50, x.shape[1])).astype(np.float32)
    build_index(x, rows, tmp_path / "flat")
    build_index(x, rows, tmp_path / kind, kind=kind)
    with open_index(tmp_path / "flat") as exact, open_index(tmp_path / kind) as approx:
        truth, got = _top(exact, q, 10), _top(approx, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])
    assert recall >= least, f"{kind} recall@10 {recall:.2f}"
    assert factory_string(kind, 2000, 32) in open_index(tmp_path / kind).meta["factory"]


def test_an_existing_index_is_replaced_only_when_asked(tmp_path: Path) -> None:
    x, rows = _data(100)
    build_index(x, rows, tmp_path / "idx")
    with pytest.raises(ValueError, match="already holds files.*overwrite"):
        build_index(x[:10], rows[:10], tmp_path / "idx")
    assert open_index(tmp_path / "idx").count == 100  # untouched
    build_index(x[:10], rows[:10], tmp_path / "idx", overwrite=True)
    assert open_index(tmp_path / "idx").count == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary or old folder left
    assert (tmp_path / "idx").stat().st_mode & 0o055 == 0o055  # readable by others, like a model directory


def test_an_index_without_offsets_still_opens(tmp_path: Path) -> None:
    x, rows = _data(50)
    build_index(x, rows, tmp_path / "idx")
    (tmp_path / "idx" / "rows.offsets.npy").unlink()
    assert _top(open_index(tmp_path / "idx"), x[[42]], 1) == [["r42"]]


def test_bad_input_is_named(tmp_path: Path) -> None:
    x, rows = _data(20)
    with pytest.raises(ValueError, match="20 embeddings for 19 rows"):
        build_index(x, rows[:19], tmp_path / "a")
    with pytest.raises(ValueError, match="zero rows"):
        build_index(x[:0], [], tmp_path / "b")
    with pytest.raises(ValueError, match="index kind must be one of flat, hnsw, ivfpq"):
        build_index(x, rows, tmp_path / "c", kind="lsh")
    build_index(x, rows, tmp_path / "d")
    with pytest.raises(ValueError, match="dimension 32 but the queries have 8"):
        open_index(tmp_path / "d").search(x[:1, :8])
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        open_index(tmp_path)

"""tools/search.py: a FAISS index over encoded rows answers text and image queries."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmembed.cli import main as mmembed_main
from tests.eval.helpers import write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_search_finds_the_identical_row(eval_setup: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    model, data = eval_setup
    search = _tool("search")
    rows = [{"text": f"label {i}"} for i in range(5)] + [{"image": str(data / "img" / "c1.png")}]
    corpus = write_jsonl(rows, tmp_path / "corpus.jsonl")
    assert search.main(["build", str(model), "--input", str(corpus), "--index", str(tmp_path / "idx")]) == 0
    hits = search.search(tmp_path / "idx", text="label 3", k=3)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["id"] == "3"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and hits[0]["score"] >= hits[1]["score"]
    assert search.search(tmp_path / "idx", image=str(data / "img" / "c1.png"), k=1)[0]["id"] == "5"
    # an index built from `mmembed encode` output gives the same answers
    assert mmembed_main(["encode", str(model), "--input", str(corpus), "--output", str(tmp_path / "e.npy")]) == 0
    args = ["build", str(model), "--input", str(corpus), "--embeddings", str(tmp_path / "e.npy")]
    assert search.main([*args, "--index", str(tmp_path / "idx2")]) == 0
    assert [h["id"] for h in search.search(tmp_path / "idx2", text="label 3", k=3)] == [h["id"] for h in hits]
    capsys.readouterr()
    assert search.main(["query", str(tmp_path / "idx"), "--text", "label 3", "-k", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].split()[0] == "1" and "label 3" in printed[0]
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["count"] == 6


def test_search_index_from_eval_candidates(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = eval_setup
    search = _tool("search")
    assert search.main(["build", str(model), "--eval-data", str(data / "N24News.jsonl"), "--index", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["count"] == 6  # 6 distinct labels of 24 slots
    assert search.main(["query", str(tmp_path)]) == 2  # no query given: a clear error

"""Both score definitions side by side: tie-aware (mmembed's headline) and MMEB-official (VLM2Vec: positive first).

The fixtures put an exact duplicate of the positive among the candidates, the case where the two definitions part:
VLM2Vec's order (``np.argmax`` / a stable ``argsort`` of descending scores) puts the positive, listed first, ahead
of its duplicate (a hit), the tie-aware definition counts the expected value over the tie (a half).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmembed.eval import compare, evaluate, hit_at_1, load_eval_sets, ranking_metrics, run_eval
from mmembed.eval.metrics import SCORE_DEFINITIONS, official_headline, official_metrics, stable_ranks
from mmembed.eval.report import write_scores
from mmembed.eval.tasks import read_task_meta
from tests.conftest import make_image
from tests.eval.helpers import ConstantModel, OracleModel, write_jsonl

M = 4  # candidates per row


def _row(i: int, kind: str) -> dict:
    """Query ``item i`` (OracleModel: one-hot i) against 4 labels, positive first; ``kind`` decides the outcome.

    - ``clean``: positive ``label i`` scores 1, three distinct others 0 -> a hit in both definitions;
    - ``tied``: ``label i`` again at index 2 (an exact duplicate: the same input, the same embedding) -> official
      hit@1 1, tie-aware 1/2;
    - ``miss``: the positive is ``label i+4``, ``label i`` (score 1) is at index 1 -> the positive ties with two
      others at ranks 2..4: official rank 2, tie-aware hit@1 0.
    """
    a, b, c, p = ((i + j) % 32 for j in (1, 2, 3, 4))
    ids = {"clean": [i, a, b, c], "tied": [i, a, i, b], "miss": [p, i, a, b]}[kind]
    return {
        "qry_text": f"item {i}",
        "qry_img_path": "",
        "tgt_text": [f"label {x}" for x in ids],
        "tgt_img_path": [""] * M,
    }


KINDS = {  # dataset -> kinds of its rows (interleaved, so no outcome depends on the row order)
    "dup": ["clean", "tied", "miss"] * 8 + ["clean"],  # 9 clean, 8 tied, 8 miss
    "alldup": ["tied", "tied", "miss"] * 4,  # every hit has a tied duplicate: official = 2 x tie-aware
    "visdoc": ["clean", "tied", "miss"] * 8 + ["clean"],  # the rows of "dup", headline NDCG@5
}


def _data(folder: Path) -> Path:
    """``folder/eval/*.jsonl`` and, one folder up as the demo set has it, the ``meta.json`` naming the task metrics."""
    for name, kinds in KINDS.items():
        write_jsonl([_row(i, k) for i, k in enumerate(kinds)], folder / "eval" / f"{name}.jsonl")
    tasks = {
        "dup": {"meta_task": "RET"},
        "alldup": {"meta_task": "RET"},
        "visdoc": {"meta_task": "RET", "metric": "ndcg@5"},
    }
    (folder / "meta.json").write_text(json.dumps({"tasks": tasks}))
    return folder / "eval"


def _expected(kinds: list[str]) -> dict[str, float]:
    """Per-dataset values from the construction alone (no metric code): counts of each row kind."""
    n = len(kinds)
    clean, tied, miss = (kinds.count(k) for k in ("clean", "tied", "miss"))
    return {
        "official_hit@1": (clean + tied) / n,
        "hit@1": (clean + tied / 2) / n,
        "official_mrr@10": (clean + tied + miss / 2) / n,  # a miss's positive is ranked 2nd (first among its ties)
        "mrr": (clean + tied * (1 + 1 / 2) / 2 + miss * (1 / 2 + 1 / 3 + 1 / 4) / 3) / n,
        "official_ndcg@5": (clean + tied + miss / math.log2(3)) / n,
    }


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``mmembed eval`` end to end (file reading, scoring, scores.json/.md) with the oracle model."""
    root = tmp_path_factory.mktemp("official")
    data = _data(root / "data")
    model = OracleModel()
    model.fingerprint = "oracle"
    scores = run_eval("oracle", data, root / "out", model=model, cache_dir=None, n_examples=0)
    return root, scores


def test_a_tied_duplicate_of_the_positive_is_a_hit_officially_and_half_a_hit_tie_aware() -> None:
    s = np.array([0.8, 0.3, 0.8, 0.1])  # the positive (0) and its exact duplicate (2) tie at the top
    off = official_metrics(s, 0)
    assert off["official_hit@1"] == 1.0 and off["official_mrr@10"] == 1.0 and off["official_ndcg@5"] == 1.0
    assert ranking_metrics(s, 0)["hit@1"] == 0.5 and hit_at_1(s, 0) == 0.5
    assert ranking_metrics(s, 0)["mrr"] == pytest.approx(0.75)
    # the duplicate listed before the positive wins instead: the official order is the list order
    assert official_metrics(s, 2)["official_hit@1"] == 0.0 and official_metrics(s, 2)["official_mrr@10"] == 0.5


@pytest.mark.parametrize("name", sorted(KINDS))
def test_dataset_scores_match_the_counts_of_the_fixture(oracle_run: tuple[Path, dict], name: str) -> None:
    _, s = oracle_run
    d, want = s["datasets"][name], _expected(KINDS[name])
    for key, value in want.items():
        assert d[key] == pytest.approx(value), f"{name}: {key} = {d[key]}, expected {value} from the row kinds"
    headline = "official_ndcg@5" if name == "visdoc" else "official_hit@1"
    assert d["official_metric"] == headline and d["official"] == d[headline]
    if name == "alldup":  # the 0.672-vs-0.336 pattern: every hit tied with its duplicate
        assert d["official_hit@1"] == pytest.approx(2 * d["hit@1"]) and d["official_hit@1"] == pytest.approx(8 / 12)


def test_tie_aware_numbers_are_the_per_row_ranking_metrics(oracle_run: tuple[Path, dict]) -> None:
    """Adding the official keys left the tie-aware ones as they were: the mean of ``ranking_metrics`` per row."""
    _, s = oracle_run
    rows = [_row(i, k) for i, k in enumerate(KINDS["dup"])]
    emb = {t: np.eye(32)[int(t.split()[-1]) % 32] for r in rows for t in [r["qry_text"], *r["tgt_text"]]}
    per = [ranking_metrics(np.array([emb[t] @ emb[r["qry_text"]] for t in r["tgt_text"]]), 0) for r in rows]
    d = s["datasets"]["dup"]
    for key in per[0]:
        assert d[key] == float(np.mean([m[key] for m in per])), key  # bit-identical
    assert s["overall"] == float(np.mean([v["hit@1"] for v in s["datasets"].values()]))


def test_means_and_groups_carry_the_official_score(oracle_run: tuple[Path, dict]) -> None:
    _, s = oracle_run
    official = [d["official"] for d in s["datasets"].values()]
    assert s["official_overall"] == pytest.approx(float(np.mean(official))) == s["means"]["official"]
    assert s["meta_tasks"]["RET"]["official"] == pytest.approx(s["official_overall"])
    assert s["overall"] == pytest.approx(s["meta_tasks"]["RET"]["hit@1"])  # the headline is still tie-aware


def test_scores_json_documents_both_definitions(oracle_run: tuple[Path, dict]) -> None:
    root, _ = oracle_run
    doc = json.loads((root / "out" / "scores.json").read_text())
    defs = doc["score_definitions"]
    assert defs == json.loads(json.dumps(SCORE_DEFINITIONS)) and defs["version"].startswith("mmembed-scores/")
    assert "VLM2Vec" in defs["official"]["definition"] and "published MMEB" in defs["official"]["comparable_with"]
    assert "src/eval_utils/metrics.py" in defs["official"]["source"]
    d = doc["datasets"]["dup"]
    assert {"hit@1", "mrr", "official", "official_metric", "official_hit@1", "official_mrr@10"} <= set(d)
    assert "official_ndcg@5" in d and "official_recall@5" in d and doc["official_overall"] == doc["means"]["official"]


def test_scores_md_shows_the_official_column_beside_hit_at_1(oracle_run: tuple[Path, dict]) -> None:
    root, s = oracle_run
    lines = (root / "out" / "scores.md").read_text().splitlines()
    head = next(ln for ln in lines if ln.startswith("| Meta-task |")).split("|")
    assert head[5].strip() == "hit@1" and head[6].strip() == "official (MMEB)"
    for name, cell in (("dup", "68.0"), ("alldup", f"{100 * 8 / 12:.1f}")):
        row = next(ln for ln in lines if ln.startswith(f"| RET | {name} |")).split("|")
        assert row[6].strip() == cell and row[5].strip() == f"{100 * s['datasets'][name]['hit@1']:.1f}"
    visdoc = next(ln for ln in lines if ln.startswith("| RET | visdoc |")).split("|")
    assert visdoc[6].strip() == f"{100 * s['datasets']['visdoc']['official_ndcg@5']:.1f} ndcg@5"
    summary = next(ln for ln in lines if ln.startswith("| official (MMEB) |")).split("|")
    assert summary[-2].strip() == f"{100 * s['official_overall']:.1f}"
    assert any("comparable with published MMEB tables" in ln for ln in lines)


def test_tiny_model_run_has_both_columns(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    """The real tiny model through ``run_eval`` (the fixture the other eval tests use): both numbers, every dataset."""
    model, data = eval_setup
    s = run_eval(model, data, tmp_path / "out", cache_dir=None, n_examples=0)
    md = (tmp_path / "out" / "scores.md").read_text()
    assert "| hit@1 | official (MMEB) | chance |" in md and "| official (MMEB) |" in md
    for name, d in s["datasets"].items():
        assert 0.0 <= d["official"] <= 1.0 and d["official_metric"] == "official_hit@1", name
        assert d["official"] == d["official_hit@1"] and s["means"]["official"] == pytest.approx(s["official_overall"])


def test_mrr_at_10_is_zero_when_the_positive_is_ranked_11th() -> None:
    s = np.concatenate([[0.5], np.linspace(0.6, 0.9, 10), [0.1]])  # 10 candidates above the positive
    off = official_metrics(s, 0)
    assert stable_ranks(s)[0] == 11
    assert off["official_mrr@10"] == 0.0 and off["official_hit@10"] == 0.0 and off["official_ndcg@10"] == 0.0
    assert ranking_metrics(s, 0)["mrr"] == pytest.approx(1 / 11)  # the tie-aware MRR has no cut-off
    assert official_metrics(s, 0, ks=(11,))["official_mrr@11"] == pytest.approx(1 / 11)


def test_ndcg_at_5_by_hand() -> None:
    s = np.array([0.2, 0.9, 0.5, 0.7, 0.1, 0.3])  # order: 1, 3, 2, 5, 0, 4
    off = official_metrics(s, [0, 2])  # relevant at ranks 3 and 5
    assert off["official_ndcg@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(6)) / (1 + 1 / math.log2(3)))
    assert off["official_recall@1"] == 0.0 and off["official_recall@5"] == 1.0 and off["official_mrr@5"] == 1 / 3
    tied = np.array([0.5, 0.5, 0.9, 0.5])  # graded gains 2, 0, 0, 1; order 2, 0, 1, 3 (ties in list order)
    gains = np.array([2.0, 0.0, 0.0, 1.0])
    want = (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3))
    assert official_metrics(tied, gains)["official_ndcg@5"] == pytest.approx(want)
    assert ranking_metrics(tied, gains)["ndcg@5"] != pytest.approx(want)  # tie-aware: the tie's mean gain


def test_stable_ranks_are_vectorised_over_queries() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 3, size=(50, 7)).astype(np.float64)  # many exact ties
    ranks = stable_ranks(s)
    for row, r in zip(s, ranks):
        order = sorted(range(7), key=lambda j: (-row[j], j))  # descending score, then list order
        assert [order.index(j) + 1 for j in range(7)] == r.tolist()


def test_hit_at_1_and_the_pipeline_agree_on_near_ties() -> None:
    """``protocol.hit_at_1`` is the pipeline's hit@1: one implementation, one tolerance (TIE_TOL)."""
    for near in (np.array([0.3, 0.3 + 1e-7, 0.1]), np.array([0.3, 0.3 - 1e-7, 0.1])):
        assert hit_at_1(near, 0) == 0.5 == ranking_metrics(near, 0)["hit@1"]
    rng = np.random.default_rng(1)
    rows = []
    for r in range(200):
        s = rng.random(5)
        if r % 3 == 0:
            s[0] = s.max() + 0.01
            s[1 + r % 4] = s[0] + 1e-7  # a near-tie just above the positive: a tie (1/2), not a miss
        rows.append(s)
    ours = np.mean([hit_at_1(s, 0) for s in rows])
    assert ours == np.mean([ranking_metrics(s, 0)["hit@1"] for s in rows])
    exact = np.mean([0.0 if (s > s[0]).any() else 1.0 / (s == s[0]).sum() for s in rows])  # the old exact-tie rule
    assert exact != ours  # the fixture has near-ties that an exact comparison scores differently


def test_official_headline_from_the_task_metric() -> None:
    assert official_headline(None) == "official_hit@1" and official_headline("hit@1") == "official_hit@1"
    assert official_headline("ndcg") == "official_ndcg@5" == official_headline("ndcg_linear@5")
    assert official_headline("NDCG@10") == "official_ndcg@10" and official_headline("mrr") == "official_mrr@10"
    for bad in ("accuracy", "ndcg@0", "hit@x"):
        with pytest.raises(ValueError, match="task metric"):
            official_headline(bad)


def test_missing_image_rows_are_official_misses_too(tmp_path: Path) -> None:
    rows = [_row(i, "clean") for i in range(4)]
    (tmp_path / "img").mkdir()
    make_image(0).save(
        tmp_path / "img" / "ok.png"
    )  # one readable image: a set whose every image is missing is an error
    rows[1]["qry_img_path"], rows[1]["qry_text"] = "img/none.png", "<|image_1|> item 1"
    rows[2]["qry_img_path"], rows[2]["qry_text"] = "img/ok.png", "<|image_1|> item 2"
    write_jsonl(rows, tmp_path / "d.jsonl")
    d = evaluate(OracleModel(), load_eval_sets(tmp_path))["datasets"]["d"]
    assert d["missing_images"] == 1 and d["official_hit@1"] == 0.75 == d["hit@1"] and d["official_ndcg@5"] == 0.75


def _compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    return compare.run(p.parse_args(argv))


def test_compare_shows_the_official_scores_of_each_run(oracle_run: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    root, _ = oracle_run
    data = root / "data" / "eval"
    const = evaluate(ConstantModel(), load_eval_sets(data), task_meta=read_task_meta(data))
    write_scores(const, tmp_path / "const", model="const", model_fingerprint="c", data="d")
    old = tmp_path / "old" / "scores.json"  # a scores.json from before the official scores
    old.parent.mkdir()
    old.write_text(json.dumps({"datasets": {"dup": {"hit@1": 0.5, "meta_task": "RET"}}, "overall": 0.5}))
    assert _compare([str(root / "out"), str(tmp_path / "const"), str(old), "--labels", "oracle,const,old"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("## official (MMEB) (%)")
    tie_aware, official = lines[:start], lines[start:]
    assert "| dup | RET | **52.0** | 25.0 | 50.0 |" in tie_aware
    assert "| dup | RET | 68.0 | **100.0** | - |" in official  # a constant model wins every tie officially
    assert "| alldup | RET | 66.7 | **100.0** | - |" in official
    assert any(ln.startswith("| **Overall** | | ") for ln in official)
    assert _compare([str(old)]) == 0 and "official (MMEB)" not in capsys.readouterr().out  # none has it: no table
    assert _compare([str(root / "out"), "--metric", "official"]) == 0
    assert "| dup | RET | 68.0 |" in capsys.readouterr().out


def test_training_can_select_the_best_checkpoint_by_the_official_score(oracle_run: tuple[Path, dict]) -> None:
    from mmembed.config import check_metric_name
    from mmembed.eval.protocol import select_metric
    from mmembed.types import ConfigError

    _, s = oracle_run
    for name in ("official", "official_hit@5", "official_mrr@10"):
        check_metric_name("train.eval_metric", name)
    assert select_metric(s, "official") == s["official_overall"] != s["overall"]
    per_dataset = [d["official_hit@1"] for d in s["datasets"].values()]
    assert select_metric(s, "official_hit@1") == pytest.approx(sum(per_dataset) / len(per_dataset))
    with pytest.raises(ConfigError, match="official"):
        check_metric_name("train.eval_metric", "official_top@1")

"""The MMEB protocol with fake models whose answers are known: oracle, constant, missing images, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmembed.data.formats import EvalExample
from mmembed.data.sample import Side
from mmembed.eval import EmbeddingCache, eval_in_training, evaluate, load_eval_sets, select_metric
from mmembed.eval.embed import encode_plan, plan_dataset
from tests.eval.helpers import ConstantModel, OracleModel, known_set, write_jsonl


def test_oracle_scores_one_and_constant_scores_chance(tmp_path: Path) -> None:
    known_set(tmp_path, n=6, k=4, name="known")
    sets = load_eval_sets(tmp_path)
    oracle = evaluate(OracleModel(), sets)
    d = oracle["datasets"]["known"]
    assert d["hit@1"] == 1.0 and d["mrr"] == 1.0 and d["ndcg@5"] == 1.0 and d["n"] == 6
    const = evaluate(ConstantModel(), sets)["datasets"]["known"]
    assert const["hit@1"] == pytest.approx(0.25) == pytest.approx(const["chance"])
    assert const["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert const["hit@5"] == pytest.approx(1.0)


def test_shared_candidates_are_encoded_once(tmp_path: Path) -> None:
    known_set(tmp_path, n=6, k=4)
    model = OracleModel()
    scores = evaluate(model, load_eval_sets(tmp_path))
    # 6 queries + 6 distinct labels, although 24 candidate slots
    assert sum(model.calls) == 12 and scores["encode"]["unique"] == 12


def test_missing_image_is_a_miss_in_the_denominator(tmp_path: Path) -> None:
    known_set(tmp_path, n=6, k=4)
    (tmp_path / "img" / "2.png").unlink()
    (tmp_path / "img" / "4.png").write_bytes(b"")  # empty file counts as missing
    sets = load_eval_sets(tmp_path)
    assert len(sets["known"]) == 6 and sets["known"][2].meta["missing_images"] == ["query"]
    model = OracleModel()
    d = evaluate(model, sets)["datasets"]["known"]
    assert d["n"] == 6 and d["missing_images"] == 2
    assert d["hit@1"] == pytest.approx(4 / 6) and d["mrr"] == pytest.approx(4 / 6)
    assert sum(model.calls) == 10  # the two queries with missing images were never encoded


def test_error_names_dataset_and_row() -> None:
    q = Side(text="item 0")
    good = EvalExample(query=q, candidates=[Side(text="label 0")], source="f.jsonl:0")
    empty = EvalExample(query=q, candidates=[], source="f.jsonl:1")
    with pytest.raises(ValueError, match=r"eval set 'ds', row 1 \(f.jsonl:1\): empty candidate list"):
        evaluate(OracleModel(), {"ds": [good, empty]})
    bad = EvalExample(query=q, candidates=[Side(text="label 0")], positive=3)
    with pytest.raises(ValueError, match=r"eval set 'ds', row 1.*positive index 3 out of range for 1"):
        evaluate(OracleModel(), {"ds": [good, bad]})


def test_empty_candidate_list_in_a_file_names_file_and_row(tmp_path: Path) -> None:
    rows = [
        {"qry_text": "item 0", "qry_img_path": "", "tgt_text": ["label 0"], "tgt_img_path": [""]},
        {"qry_text": "item 1", "qry_img_path": "", "tgt_text": [], "tgt_img_path": []},
    ]
    write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl.*(row|:)\s*2?.*no candidates"):
        load_eval_sets(tmp_path)


def test_meta_tasks_splits_and_selection(tmp_path: Path) -> None:
    data = tmp_path / "eval"  # meta.json one folder up, as the demo set writes it
    known_set(data, n=4, k=2, name="N24News", images=False)
    known_set(data, n=4, k=4, name="RefCOCO", images=False)
    known_set(data, n=4, k=4, name="custom", images=False)
    (tmp_path / "meta.json").write_text(json.dumps({"tasks": {"custom": {"meta_task": "RET"}}}))
    from mmembed.eval.tasks import read_task_meta

    s = evaluate(ConstantModel(), load_eval_sets(data), task_meta=read_task_meta(data))
    assert s["datasets"]["N24News"]["meta_task"] == "CLS" and s["datasets"]["RefCOCO"]["split"] == "OOD"
    assert list(s["meta_tasks"]) == ["CLS", "RET", "VG"]
    assert s["splits"]["IND"]["hit@1"] == pytest.approx(0.5) and s["splits"]["OOD"]["hit@1"] == pytest.approx(0.25)
    assert s["overall"] == pytest.approx((0.5 + 0.25 + 0.25) / 3) == s["mean_hit@1"]
    assert select_metric(s, "CLS") == pytest.approx(0.5)
    assert select_metric(s, "RefCOCO/hit@1") == pytest.approx(0.25)
    assert select_metric(s, "mrr") == pytest.approx(s["means"]["mrr"])
    with pytest.raises(KeyError, match="unknown eval metric"):
        select_metric(s, "nope")


def test_corpus_level_retrieval(tmp_path: Path) -> None:
    known_set(tmp_path, n=5, k=2, name="ret", images=False)
    s = evaluate(OracleModel(), load_eval_sets(tmp_path), corpus="all")
    c = s["datasets"]["ret"]["corpus"]
    assert c["corpus_size"] == 5 and c["recall@1"] == 1.0 and c["ndcg@10"] == 1.0
    c = evaluate(ConstantModel(), load_eval_sets(tmp_path), corpus=["ret"])["datasets"]["ret"]["corpus"]
    assert c["hit@1"] == pytest.approx(1 / 5) and c["recall@5"] == pytest.approx(1.0)


def test_cache_resume_encodes_only_what_is_missing(tmp_path: Path) -> None:
    known_set(tmp_path, n=6, k=4, images=False)
    plan = plan_dataset("known", load_eval_sets(tmp_path)["known"])
    cache = EmbeddingCache(tmp_path / "cache", "fp")
    first, stats = encode_plan(OracleModel(), plan, cache=cache, block_rows=4, batch_size=2)
    assert stats == {"encoded": 12, "cached": 0, "missing": 0}
    parts = sorted(cache.folder(plan).glob("part-*.json"))
    assert len(parts) == 3
    parts[1].unlink()  # a run killed before this block was written
    model = OracleModel()
    again, stats = encode_plan(model, plan, cache=cache, block_rows=4, batch_size=2)
    assert stats == {"encoded": 4, "cached": 8, "missing": 0} and sum(model.calls) == 4
    np.testing.assert_array_equal(first, again)
    assert not list(cache.folder(plan).glob("*.pkl")) and not list(cache.folder(plan).glob(".*tmp*"))


def test_cache_with_another_dimension_is_a_clear_error(tmp_path: Path) -> None:
    known_set(tmp_path, n=4, k=2, name="dimset", images=False)
    sets = load_eval_sets(tmp_path)
    cache = EmbeddingCache(tmp_path / "cache", "fp")
    plan = plan_dataset("dimset", sets["dimset"])
    cache.write(plan, np.arange(3), np.ones((3, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"eval set 'dimset'.*dimension 16 but the model gives 32"):
        evaluate(OracleModel(), sets, cache=cache)


def test_eval_in_training_restores_mode_and_reports_selection(tmp_path: Path, tiny_model) -> None:
    known_set(tmp_path, n=3, k=2, name="held_out")
    sets = load_eval_sets(tmp_path, placeholder=tiny_model.processor.placeholder)
    tiny_model.train()
    s = eval_in_training(tiny_model, sets, metric="mrr", batch_size=4)
    assert tiny_model.training
    assert s["selection"]["metric"] == "mrr" and s["selection"]["value"] == pytest.approx(s["means"]["mrr"])
    assert s["flat"]["eval/held_out/hit@1"] == s["datasets"]["held_out"]["hit@1"]
    assert 0.0 <= s["flat"]["eval/mean_hit@1"] <= 1.0 and "mean_hit@1" in s


def test_demo_set_meta_tasks_and_constant_model_at_chance(demo_data: Path) -> None:
    from mmembed.eval.tasks import read_task_meta

    meta = json.loads((demo_data / "meta.json").read_text())["tasks"]
    s = evaluate(ConstantModel(), load_eval_sets(demo_data / "eval"), task_meta=read_task_meta(demo_data / "eval"))
    assert list(s["meta_tasks"]) == ["CLS", "VQA", "RET", "VG"]
    for name, d in s["datasets"].items():
        assert d["meta_task"] == meta[name]["meta_task"]
        assert d["hit@1"] == pytest.approx(meta[name]["chance"], abs=1e-12), name

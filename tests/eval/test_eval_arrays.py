"""Eval in arrays (#16): vectorized metrics, the de-duplicated table and keys computed once per distinct input.

Every comparison is exact (``==``): the array path must give the floats of the per-query reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mmembed.eval.plan as plan_mod
from mmembed import dist
from mmembed.data.formats import EvalExample
from mmembed.eval.batch_metrics import metric_names, score_block
from mmembed.eval.examples import margin_of
from mmembed.eval.metrics import official_metrics, ranking_metrics
from mmembed.eval.plan import plan_dataset, side_key
from mmembed.eval.scoring import official_ks, score_plan
from mmembed.types import Side

KS, OKS = [1, 3, 5, 10], official_ks([1, 3, 5, 10], "official_ndcg@5")


def _reference_row(scores: np.ndarray, positive: int, tol: float) -> dict[str, float]:
    m = ranking_metrics(scores, positive, KS, tol)
    m.update(official_metrics(scores, positive, OKS))
    m["_margin"], m["_best_negative"] = margin_of(scores, positive)
    return m


@pytest.mark.parametrize("tol", [1e-6, 0.0, 0.25])
def test_vectorized_metrics_equal_the_reference_on_random_ties(tol: float) -> None:
    rng = np.random.default_rng(7)
    for width in (1, 2, 3, 7, 12, 40):
        n = 60
        # few distinct values -> many ties; small noise -> chained groups under tol = 0.25
        scores = rng.integers(0, 4, size=(n, width)).astype(np.float64)
        scores[n // 2 :] += rng.uniform(0, 0.3, size=(n - n // 2, width))
        scores[::7, 0] = -np.inf
        positive = rng.integers(0, width, size=n)
        got = score_block(scores, positive, KS, OKS, tol)
        assert list(got)[: len(metric_names(KS, OKS))] == metric_names(KS, OKS)
        for r in range(n):
            ref = _reference_row(scores[r], int(positive[r]), tol)
            for k, v in ref.items():
                assert got[k][r] == v, (width, r, k, got[k][r], v)


def test_vectorized_metrics_without_ties_take_the_fast_path_and_still_agree() -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((200, 100))
    scores[5] = scores[5, 0]  # one row entirely tied: the sorted path for that row only
    positive = rng.integers(0, 100, size=200)
    got = score_block(scores, positive, KS, OKS)
    for r in range(200):
        for k, v in _reference_row(scores[r], int(positive[r]), 1e-6).items():
            assert got[k][r] == v, (r, k)


def _sides(n: int, m: int, tmp: Path) -> list[EvalExample]:
    """n rows over m shared labels (fresh objects per pair), one image candidate spelled as str and as Path."""
    img = tmp / "a.png"
    rows = []
    for i in range(n):
        p = i % m
        labels = [p, *(j for j in range(m) if j != p)]
        cands = [Side(text=f"label {j}") for j in labels]
        cands.append(Side(instruction="Represent the image.", images=[str(img) if i % 2 else img]))
        cands.append(Side(text=f"label {labels[1]}"))  # a duplicate within the row
        meta = {"missing_images": ["candidate 1"]} if i == 3 else {}
        rows.append(EvalExample(query=Side(text=f"query {i % (n - 2)}"), candidates=cands, meta=meta))
    return rows


def _embed(side: Side, dim: int = 16) -> np.ndarray:
    seed = abs(hash(side_key(side))) % (2**32)
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return np.round(v, 1)  # coarse values: ties between different inputs happen


def test_deduplicated_table_scores_equal_the_per_pair_path(tmp_path: Path) -> None:
    examples = _sides(40, 9, tmp_path)
    plan = plan_dataset("arrays", examples)
    assert len(plan.sides) == (40 - 2) + 9 + 1  # queries (two repeat), labels, the image in two spellings
    emb = np.stack([_embed(s) for s in plan.sides])
    d = score_plan(plan, emb, ks=KS, official="official_ndcg@5", n_examples=3, confusion=True, corpus=True)
    per: dict[str, list[float]] = {}
    for ex in examples:  # the per-pair path: every pair embedded on its own, float64 per row
        if ex.meta.get("missing_images"):
            ref = dict.fromkeys(metric_names(KS, OKS), 0.0)
        else:
            c = np.stack([_embed(s) for s in ex.candidates]).astype(np.float64)
            scores = c @ _embed(ex.query).astype(np.float64)
            ref = ranking_metrics(scores, ex.positive, KS)
            ref.update(official_metrics(scores, ex.positive, OKS))
        for k, v in ref.items():
            per.setdefault(k, []).append(v)
    for k, v in per.items():
        assert d[k] == float(np.mean(v)), k
    assert d["missing_images"] == 1 and d["official"] == d["official_ndcg@5"]
    assert plan.missing.sum() == 1 and plan.missing_rows[3]
    assert [len(c) for c in plan.cand_idx] == [11] * 40
    assert np.array_equal(plan.cand_idx[4], plan.row_cands(4))


def test_side_key_once_per_distinct_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    real = plan_mod.side_key

    def counting(side: Side) -> tuple:
        calls.append(real(side))
        return calls[-1]

    monkeypatch.setattr(plan_mod, "side_key", counting)
    examples = _sides(50, 20, tmp_path)
    plan = plan_dataset("count", examples)
    pairs = sum(len(ex.candidates) + 1 for ex in examples)
    assert pairs == 50 * 23
    # one call per distinct raw spelling: 48 queries, 20 labels, the image as str and as Path (one input)
    assert len(calls) == 48 + 20 + 2 and len(plan.sides) == 48 + 20 + 1
    assert len(set(calls)) == len(plan.sides)


def test_fingerprint_follows_the_data_and_unhashable_images(tmp_path: Path) -> None:
    a = plan_dataset("f", _sides(10, 4, tmp_path))
    assert plan_dataset("f", _sides(10, 4, tmp_path)).fingerprint == a.fingerprint
    rows = _sides(10, 4, tmp_path)
    rows[2] = EvalExample(query=rows[2].query, candidates=rows[2].candidates[::-1], positive=5)
    assert plan_dataset("f", rows).fingerprint != a.fingerprint
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)  # unhashable: identified by object, then by content
    arr_rows = [EvalExample(query=Side(text=f"q{i}"), candidates=[Side(images=[pixels.copy()])]) for i in range(3)]
    assert len(plan_dataset("arr", arr_rows).sides) == 4


def test_bad_rows_name_the_row() -> None:
    rows = [EvalExample(query=Side(text="q"), candidates=[Side(text="c")]) for _ in range(3)]
    rows[1] = EvalExample(query=Side(text="q"), candidates=[Side(text="c")], positive=2)
    with pytest.raises(ValueError, match=r"row 1: positive index 2 out of range for 1 candidates"):
        plan_dataset("bad", rows)


def test_shard_helpers_without_a_process_group() -> None:
    assert dist.shard_range(7) == (0, 7)
    x = {"a": np.arange(3)}
    assert dist.all_gather_rows(x) is x

"""Tie-aware ranking metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmembed.eval import hit_at_1, hit_at_k, mrr, ndcg_at_k, ranking_metrics, recall_at_k
from mmembed.eval.tasks import MMEB_V1, task_info


def test_no_ties_match_the_textbook_values() -> None:
    s = np.array([0.2, 0.9, 0.5, 0.1])  # positive 0 ranks 3rd
    assert hit_at_k(s, 0, 1) == 0.0 and hit_at_k(s, 0, 2) == 0.0 and hit_at_k(s, 0, 3) == 1.0
    assert mrr(s, 0) == pytest.approx(1 / 3)
    assert ndcg_at_k(s, 0, 5) == pytest.approx(1 / math.log2(4))
    assert ndcg_at_k(s, 0, 2) == 0.0
    assert recall_at_k(s, [0, 2], 2) == pytest.approx(0.5)  # 2 relevant, only index 2 in the top 2


def test_constant_scores_give_chance() -> None:
    s = np.zeros(4)
    assert hit_at_k(s, 0, 1) == pytest.approx(0.25)
    assert hit_at_k(s, 0, 3) == pytest.approx(0.75)
    assert hit_at_1(s, 0) == pytest.approx(0.25)
    assert mrr(s, 0) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # ndcg@2: each of the first 2 ranks gets the mean gain 1/4
    assert ndcg_at_k(s, 0, 2) == pytest.approx(0.25 * (1 + 1 / math.log2(3)))


def test_ties_inside_the_ranking() -> None:
    s = np.array([0.5, 0.9, 0.5, 0.5, 0.1])  # 1 above, positive tied with 2 others at ranks 2..4
    assert hit_at_k(s, 0, 1) == 0.0
    assert hit_at_k(s, 0, 2) == pytest.approx(1 / 3)
    assert hit_at_k(s, 0, 4) == 1.0
    assert mrr(s, 0) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    expected = (1 / math.log2(3) + 1 / math.log2(4)) / 3  # ranks 2, 3 in the top 3, mean gain 1/3
    assert ndcg_at_k(s, 0, 3) == pytest.approx(expected)


def test_several_relevant_tied() -> None:
    s = np.array([1.0, 1.0, 1.0, 0.0])  # relevant 0 and 1 tied with irrelevant 2
    # P(no relevant in the first slot) = 1/3
    assert hit_at_k(s, [0, 1], 1) == pytest.approx(2 / 3)
    # first relevant at rank 1 w.p. 2/3, at rank 2 w.p. 1/3
    assert mrr(s, [0, 1]) == pytest.approx(2 / 3 + (1 / 3) / 2)
    assert recall_at_k(s, [0, 1], 2) == pytest.approx(2 * (2 / 3) / 2)
    graded = np.array([2.0, 0.0, 1.0, 0.0])
    assert ndcg_at_k(np.array([0.1, 0.9, 0.5, 0.0]), graded, 3) == pytest.approx(
        (0 + 1 / math.log2(3) + 2 / math.log2(4)) / (2 + 1 / math.log2(3))
    )


def test_tolerance_makes_float_noise_a_tie() -> None:
    s = np.array([0.3, 0.3 + 1e-9, 0.1])
    assert hit_at_k(s, 0, 1) == pytest.approx(0.5)
    assert hit_at_k(s, 0, 1, tol=0.0) == 0.0


def test_ranking_metrics_keys_and_bad_index() -> None:
    m = ranking_metrics(np.array([0.9, 0.1]), 0, (1, 5))
    assert m == {"hit@1": 1, "hit@5": 1, "recall@1": 1, "recall@5": 1, "mrr": 1, "ndcg@1": 1, "ndcg@5": 1}
    with pytest.raises(IndexError, match="out of range"):
        mrr(np.array([0.1, 0.2]), 5)


def test_mmeb_v1_table() -> None:
    assert len(MMEB_V1) == 36
    counts: dict[tuple[str, str], int] = {}
    for mt, split in MMEB_V1.values():
        counts[(mt, split)] = counts.get((mt, split), 0) + 1
    assert sum(v for (m, _), v in counts.items() if m == "CLS") == 10
    assert sum(v for (m, _), v in counts.items() if m == "RET") == 12
    assert sum(v for (_, s), v in counts.items() if s == "IND") == 20
    assert task_info("ImageNet_1K") == {"meta_task": "CLS", "split": "IND", "mmeb": True}
    assert task_info("visual7w-pointing")["split"] == "OOD"
    assert task_info("mine", {"mine": {"meta_task": "RET"}})["meta_task"] == "RET"

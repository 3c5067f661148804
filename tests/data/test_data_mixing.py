"""Mixing: rank-independent global batches, proportions, homogeneity, epochs, resume; the collator."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mmembed.data import (
    Collator,
    DatasetSpec,
    MixtureSampler,
    Sample,
    SampleDataset,
    Side,
    StepLoader,
    TrainBatches,
    group_by_length,
    sample_length,
)
from tests.data.data_helpers import make_train_set


def test_global_batch_is_the_same_for_any_world_size():
    s = MixtureSampler([50, 30, 7], [1.0, 2.0, 1.0], global_batch_size=16, seed=3)
    for step in (0, 1, 9, 4):
        full = s.global_batch(step)
        assert len(full) == 16
        for world in (2, 4, 8):
            parts = [full[s.local_slice(r, world)] for r in range(world)]
            assert [x for p in parts for x in p] == full
            fresh = MixtureSampler([50, 30, 7], [1.0, 2.0, 1.0], global_batch_size=16, seed=3)
            assert fresh.global_batch(step) == full  # random access gives what sequential access gave
    assert MixtureSampler([50, 30, 7], [1.0, 2.0, 1.0], 16, seed=4).global_batch(0) != s.global_batch(0)
    with pytest.raises(ValueError, match="not divisible"):
        s.local_slice(0, 3)


def test_proportions_and_epoch_coverage():
    s = MixtureSampler([40, 400], [3.0, 1.0], global_batch_size=40, seed=0)
    pairs = [p for step in range(100) for p in s.global_batch(step)]
    frac = Counter(d for d, _ in pairs)[0] / len(pairs)
    assert abs(frac - 0.75) < 0.02
    rows0 = [i for d, i in pairs if d == 0]
    for e in range(len(rows0) // 40):  # every row of dataset 0 exactly once per epoch
        assert sorted(rows0[e * 40 : (e + 1) * 40]) == list(range(40))
    assert rows0[:40] != rows0[40:80]  # reshuffled per epoch


def test_homogeneous_batches_and_default_weights():
    s = MixtureSampler([100, 300], None, global_batch_size=8, seed=1, homogeneous=True)
    which = []
    for step in range(200):
        ds = {d for d, _ in s.global_batch(step)}
        assert len(ds) == 1
        which.append(ds.pop())
    assert abs(which.count(1) / 200 - 0.75) < 0.1  # default weight: proportional to size


def test_sequential_mode_reads_in_order():
    s = MixtureSampler([3, 2], global_batch_size=4, shuffle=False)
    assert s.global_batch(0) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert s.global_batch(1) == [(1, 1), (0, 0), (0, 1), (0, 2)]


def _sample(i: int, n_neg: int) -> Sample:
    return Sample(Side(text=f"q{i}"), Side(text=f"p{i}"), [Side(text=f"n{i}_{j}") for j in range(n_neg)])


def test_collator_groups_targets_per_query(processor):
    samples = [_sample(0, 3), _sample(1, 1), _sample(2, 0)]
    out = Collator(processor, num_negatives=2)(samples)
    texts = [" " + t for t in ["p0", "n0_0", "n0_1", "p1", "n1_0", "n1_0", "p2", "p2", "p2"]]
    assert out["target"]["input_ids"].shape[0] == 9 and out["num_negatives"] == 2
    expected = processor([Side(text=t[1:]) for t in texts])["input_ids"]
    assert torch.equal(out["target"]["input_ids"], expected)
    assert out["negative_mask"].tolist() == [[True, True], [True, True], [False, False]]
    assert out["query"]["input_ids"].shape[0] == 3
    assert Collator(processor, 0)(samples)["target"]["input_ids"].shape[0] == 3


def test_collator_pads_to_longest_in_batch(processor):
    out = Collator(processor)([Sample(Side(text="ab"), Side(text="c")), Sample(Side(text="abcdef"), Side(text="c"))])
    assert out["query"]["input_ids"].shape == (2, 7) and out["query"]["attention_mask"].sum().item() == 3 + 7


def test_group_by_length_is_a_windowed_stable_sort():
    lengths = [5, 1, 3, 3, 9, 0, 2]
    order = group_by_length(lengths, lambda x: x, window=4)
    assert order == [1, 2, 3, 0, 5, 6, 4]
    assert group_by_length(lengths, lambda x: x, window=1) == list(range(7))


def _batches(tmp_path, processor, rank=0, world=1, length=False, n=24):
    if not (tmp_path / "a.parquet").exists():
        make_train_set(tmp_path, n, "a.parquet")
        make_train_set(tmp_path, n, "b.parquet", start=100)
    dss = [SampleDataset(DatasetSpec(x, [tmp_path / f"{x}.parquet"])) for x in ("a", "b")]
    sampler = MixtureSampler([len(d) for d in dss], [1.0, 1.0], global_batch_size=8, seed=5)
    coll = Collator(processor, num_negatives=1)
    return TrainBatches(
        dss, sampler, rank=rank, world_size=world, collate=coll, length=sample_length(processor) if length else None
    )


def test_train_batches_ranks_partition_the_global_batch(tmp_path, processor):
    whole = [s.positive.text for s in _batches(tmp_path, processor).samples(3)[0]]
    parts = [s.positive.text for r in range(4) for s in _batches(tmp_path, processor, r, 4).samples(3)[0]]
    assert parts == whole
    grouped = [s.positive.text for r in range(2) for s in _batches(tmp_path, processor, r, 2, True).samples(3)[0]]
    assert sorted(grouped) == sorted(whole)  # length grouping reorders, the set stays


def test_step_loader_workers_and_resume(tmp_path, processor):
    batches = _batches(tmp_path, processor)
    full = list(StepLoader(batches, max_steps=6, num_workers=2))
    assert [b["step"] for b in full] == list(range(6))
    first = StepLoader(batches, max_steps=6, num_workers=0)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    assert state["step"] == 2
    resumed = StepLoader(batches, max_steps=6, num_workers=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["step"] for b in rest] == [2, 3, 4, 5]
    for a, b in zip(rest, full[2:]):
        assert torch.equal(a["query"]["input_ids"], b["query"]["input_ids"])
        assert torch.equal(a["target"]["pixel_values"], b["target"]["pixel_values"])
    assert resumed.skips.read == 4 * 8 and resumed.skips.good == 32  # merged from the workers
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({**state, "seed": 99})


def test_target_keys_mark_identical_targets(tmp_path, processor):
    from tests.data.data_helpers import write_parquet

    rows = [
        {"qry": f"q{i}", "qry_image_path": "", "pos_text": "red" if i % 2 else "blue", "neg_text": "green"}
        for i in range(4)
    ]
    write_parquet(rows, tmp_path / "c.parquet")
    ds = SampleDataset(DatasetSpec("c", [tmp_path / "c.parquet"]))
    out = Collator(processor, num_negatives=1)([ds.parse(i) for i in range(4)])
    keys = out["target_keys"].tolist()  # [pos0, neg0, pos1, neg1, ...]
    assert len(keys) == 8 and keys[0] == keys[4] and keys[2] == keys[6] and keys[0] != keys[2]
    assert len({keys[1], keys[3], keys[5], keys[7]}) == 1  # the same negative "green" everywhere
    assert "target_keys" not in Collator(processor, 1)([_sample(0, 1)])  # no keys without reader metadata

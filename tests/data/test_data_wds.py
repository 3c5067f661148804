"""Webdataset: conversion, order fidelity, rank/worker split, shuffle, resume, truncated shards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmembed.data import DatasetSpec, SampleDataset, SkipCounter, WdsLoader, WdsStream, list_shards
from tests.data.data_helpers import make_train_set, pixel_sum

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("convert_to_wds", ROOT / "tools" / "convert_to_wds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def shards(tmp_path):
    src = make_train_set(tmp_path / "src", 40)
    out = tmp_path / "shards"
    index = _tool().convert(src, out, shard_size=5)
    assert index["total"] == 40 and len(index["shards"]) == 8
    return src, out


def _texts(batches):
    return [s.positive.text for b in batches for s in b["samples"]]


def test_shards_match_the_source_in_order(shards, processor):
    src, out = shards
    paths, counts = list_shards(out)
    assert len(paths) == 8 and sum(counts.values()) == 40
    stream = WdsStream(paths, batch_size=7, shardshuffle=False, placeholder="<image>", shard_counts=counts)
    got = [s for b in WdsLoader(stream) for s in b["samples"]]
    ds = SampleDataset(DatasetSpec("src", [src]))
    want = [ds.load(i) for i in range(40)]
    assert len(got) == 40
    for g, w in zip(got, want):
        assert (g.query.text, g.positive.text, [n.text for n in g.negatives]) == (
            w.query.text,
            w.positive.text,
            [n.text for n in w.negatives],
        )
        assert pixel_sum(g.query.images[0]) == pixel_sum(w.query.images[0])


def test_conversion_is_deterministic(tmp_path):
    src = make_train_set(tmp_path / "src", 6)
    tool = _tool()
    tool.convert(src, tmp_path / "a", shard_size=4)
    tool.convert(src, tmp_path / "b", shard_size=4)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_ranks_and_workers_split_without_overlap(shards):
    _, out = shards
    paths, _ = list_shards(out)
    seen = []
    for rank in range(2):
        stream = WdsStream(paths, batch_size=3, rank=rank, world_size=2, seed=1)
        seen.append(_texts(WdsLoader(stream, num_workers=2)))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"label {i}" for i in range(40))
    with pytest.raises(ValueError, match="8 shards cannot be split over 3 ranks x 3 workers"):
        list(WdsLoader(WdsStream(paths, batch_size=2, world_size=3), num_workers=3))


def test_shuffle_buffer_is_seeded(shards):
    _, out = shards
    paths, _ = list_shards(out)

    def run(seed):
        return _texts(WdsLoader(WdsStream(paths, batch_size=5, seed=seed, shuffle_buffer=10)))

    a = run(0)
    assert a == run(0) and a != run(1) and sorted(a) == sorted(f"label {i}" for i in range(40))
    assert a != [f"label {i}" for i in range(40)]


@pytest.mark.parametrize("buffer", [0, 6])
def test_resume_neither_replays_nor_skips(shards, buffer):
    _, out = shards
    paths, counts = list_shards(out)

    def make():
        s = WdsStream(paths, batch_size=3, seed=2, shuffle_buffer=buffer, resample=True, shard_counts=counts)
        return WdsLoader(s, num_workers=2)

    full = []
    for b in make():
        full.append([s.positive.text for s in b["samples"]])
        if len(full) == 30:  # 90 samples: more than two epochs
            break
    first = make()
    it = iter(first)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    for b in resumed:
        rest.append([s.positive.text for s in b["samples"]])
        if len(rest) == 19:
            break
    assert rest == full[11:]


def test_truncated_shard_is_counted_and_skipped(shards):
    _, out = shards
    paths, _ = list_shards(out)
    data = Path(paths[1]).read_bytes()
    cut = data.index(b"000000006.q0.png") + 512 + 40  # inside the image of its second sample
    Path(paths[1]).write_bytes(data[:cut])
    loader = WdsLoader(WdsStream(paths, batch_size=4, shardshuffle=False))
    texts = _texts(loader)
    assert texts == [f"label {i}" for i in [*range(6), *range(10, 40)]]  # the stream went on to the next shard
    assert loader.skips.events == {"truncated_shard": 1}
    assert loader.skips.skipped == {"image_missing": 1}  # the half-written sample 6
    assert loader.skips.good == len(texts) and loader.skips.good + loader.skips.num_skipped == loader.skips.read
    assert paths[1] in loader.skips.examples[0]["source"]
    with pytest.raises(Exception, match="truncated_shard"):
        list(WdsLoader(WdsStream(paths, batch_size=4, shardshuffle=False, strict=True)))


def test_bad_image_in_shard_is_skipped(tmp_path):
    src = make_train_set(tmp_path / "src", 6)
    (tmp_path / "src" / "images" / "2.png").write_bytes(b"garbage")
    index = _tool().convert(src, tmp_path / "s", shard_size=3, verify=False)  # bad bytes go into the shard
    assert index["total"] == 6
    loader = WdsLoader(WdsStream(list_shards(tmp_path / "s")[0], batch_size=2, shardshuffle=False))
    texts = _texts(loader)
    assert texts == [f"label {i}" for i in (0, 1, 3, 4, 5)]
    assert loader.skips.skipped == {"image_not_an_image": 1} and loader.skips.read == 6
    verified = _tool().convert(src, tmp_path / "v", shard_size=3)  # default: verified and skipped at conversion
    assert verified["total"] == 5 and SkipCounter.from_dict(verified["skips"]).skipped == {"image_not_an_image": 1}

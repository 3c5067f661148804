"""DataCfg -> loaders: manifest/dir/file give the map-style loader, shards the streaming one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mmembed.config import DataCfg
from mmembed.data import StepLoader, WdsLoader, build_eval_sets, build_train_loader, is_shard_spec
from mmembed.data.synthetic import generate
from tests.data.data_helpers import make_train_set

ROOT = Path(__file__).resolve().parents[2]


def _convert(src, out, **kw):
    spec = importlib.util.spec_from_file_location("convert_to_wds", ROOT / "tools" / "convert_to_wds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.convert(src, out, **kw)


def test_parquet_and_its_shards_give_the_same_batches(tmp_path, processor):
    """Same seed, no shuffle buffer, one rank: the source and its conversion feed identical batches."""
    src = make_train_set(tmp_path / "src", 24)
    _convert(src, tmp_path / "shards", shard_size=6)
    assert is_shard_spec(tmp_path / "shards") and not is_shard_spec(src)
    common = dict(shuffle_buffer=0, num_negatives=1, group_by_length=False)
    a = build_train_loader(DataCfg(train=str(src), **common), processor, global_batch_size=4, max_steps=8)
    b = build_train_loader(
        DataCfg(train=str(tmp_path / "shards"), **common), processor, global_batch_size=4, max_steps=8
    )
    assert isinstance(a, StepLoader) and isinstance(b, WdsLoader)
    got_a = list(a)
    got_b = list(b)  # endless stream, stopped by max_steps
    assert len(got_a) == len(got_b) == 8
    assert [x["step"] for x in got_b] == list(range(8))
    for x, y in zip(got_a, got_b):
        assert torch.equal(x["target_keys"], y["target_keys"]) and torch.equal(x["negative_mask"], y["negative_mask"])
        for side in ("query", "target"):
            for key in ("input_ids", "attention_mask", "pixel_values"):
                assert torch.equal(x[side][key], y[side][key])


def test_homogeneous_batches_from_shards_are_refused_by_key(tmp_path, processor):
    from mmembed.config import ConfigError

    src = make_train_set(tmp_path / "src", 12)
    _convert(src, tmp_path / "shards", shard_size=6)
    cfg = DataCfg(train=str(tmp_path / "shards"), homogeneous=True)
    with pytest.raises(ConfigError, match=r"data\.homogeneous.*manifest"):
        build_train_loader(cfg, processor, global_batch_size=4, max_steps=2)


def test_demo_manifest_trains_and_evaluates_without_conversion(tmp_path, processor):
    generate(tmp_path, n_train=30, n_eval=12, image_size=32)
    cfg = DataCfg(
        train=str(tmp_path / "train.yaml"),
        eval=str(tmp_path / "eval"),
        homogeneous=True,
        num_negatives=1,
        num_workers=1,
    )
    loader = build_train_loader(cfg, processor, global_batch_size=6, max_steps=3, seed=1, rank=1, world_size=2)
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        assert len(set(b["datasets"])) == 1  # homogeneous
        assert b["query"]["input_ids"].shape[0] == 3 and b["target"]["input_ids"].shape[0] == 6
    assert loader.skips.good == 9 and loader.skips.num_skipped == 0
    sets = build_eval_sets(cfg, placeholder="<image>")
    assert len(sets) == 6 and all(ex.positive == 0 for v in sets.values() for ex in v)


def test_missing_train_is_an_error(processor):
    with pytest.raises(ValueError, match="data.train is not set"):
        build_train_loader(DataCfg(), processor, global_batch_size=2, max_steps=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_train_loader(DataCfg(train="/nonexistent/x.parquet"), processor, global_batch_size=2, max_steps=1)

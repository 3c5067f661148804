"""Bad input: each kind is skipped and counted (good + skipped == read), or raises in strict mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed.data import (
    Collator,
    DataError,
    DatasetSpec,
    MixtureSampler,
    SampleDataset,
    SkipCounter,
    TrainBatches,
    WdsLoader,
    WdsStream,
    list_shards,
)
from tests.data.data_helpers import FakeProcessor, make_image, make_train_set, train_row, write_jsonl, write_parquet

ROOT = Path(__file__).resolve().parents[2]


def _bad_image(kind: str, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        make_image(path, size=64)
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "not_image":
        path.write_bytes(b"this is not an image at all" * 10)
    elif kind == "bomb":
        Image.new("L", (3000, 3000)).save(path)  # 9 Mpx > the 1 Mpx limit below


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("missing", "image_missing"),
        ("zero", "image_empty"),
        ("truncated", "image_corrupt"),
        ("not_image", "image_not_an_image"),
        ("bomb", "image_too_large"),
    ],
)
def test_bad_images_are_skipped_and_counted(tmp_path, kind, reason):
    for i in range(4):
        make_image(tmp_path / "images" / f"{i}.png")
    _bad_image(kind, tmp_path / "images" / "bad.png")
    rows = [train_row(0), train_row(1, "images/bad.png"), train_row(2), train_row(3)]
    write_parquet(rows, tmp_path / "d.parquet")
    ds = SampleDataset(DatasetSpec("d", [tmp_path / "d.parquet"]), max_pixels=1_000_000)
    c = SkipCounter()
    got = [ds.get(i, c) for i in range(4)]
    assert [g is None for g in got] == [False, True, False, False]
    assert c.read == 4 and c.good == 3 and c.skipped == {reason: 1} and c.good + c.num_skipped == c.read
    # rows[1] is the parquet's second row: positions in messages are 1-based
    assert c.examples[0]["source"] == f"{tmp_path / 'd.parquet'}:row 2" and "bad.png" in c.examples[0]["detail"]
    with pytest.raises(DataError, match=r"d\.parquet:row 2: .*bad\.png"):
        ds.get(1, SkipCounter(strict=True))


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "LA", "L"])
def test_unusual_image_modes_load_as_rgb(tmp_path, mode):
    p = tmp_path / "images" / "0.png"
    p.parent.mkdir(parents=True)
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(p)
    elif mode == "CMYK":
        p = p.with_suffix(".jpg")
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p)
    elif mode in ("RGBA", "LA"):
        Image.new(mode, (8, 8), (255, 0, 0, 0) if mode == "RGBA" else (0, 0)).save(p)  # fully transparent
    else:
        make_image(p, size=8, mode=mode)
    write_parquet([train_row(0, f"images/{p.name}")], tmp_path / "d.parquet")
    c = SkipCounter()
    s = SampleDataset(DatasetSpec("d", [tmp_path / "d.parquet"])).get(0, c)
    assert c.good == 1 and s is not None
    im = s.query.images[0]
    assert im.mode == "RGB" and im.size == (8, 8)
    if mode in ("RGBA", "LA"):
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_bad_rows_text_and_json(tmp_path):
    make_image(tmp_path / "images" / "0.png")
    rows = [
        json.dumps(train_row(0)),
        "{this is not json",
        json.dumps({k: v for k, v in train_row(0).items() if k != "pos_text"}),  # missing field
        json.dumps({**train_row(0), "qry": 12}),  # mistyped field
        json.dumps({**train_row(0), "qry": "   ", "qry_image_path": ""}),  # empty query
        json.dumps({**train_row(0), "pos_text": "<|image_1|>", "pos_image_path": ""}),  # empty after placeholder
        json.dumps([1, 2]),  # not an object
        json.dumps({**train_row(0), "qry": "x" * 50_000}),  # very long text: kept, cut, noted
    ]
    write_jsonl(rows, tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text((tmp_path / "d.jsonl").read_text().replace("\n", "\n\n", 1))  # blank line
    ds = SampleDataset(DatasetSpec("d", [tmp_path / "d.jsonl"]), max_text_chars=1000)
    c = SkipCounter()
    got = [ds.get(i, c) for i in range(len(ds))]
    assert len(ds) == 8
    assert [g is not None for g in got] == [True, False, False, False, False, False, False, True]
    assert c.skipped == {"bad_json": 2, "missing_field": 1, "bad_field": 1, "empty_text": 2}
    assert c.read == 8 and c.good + c.num_skipped == c.read
    assert len(got[7].query.text) == 1000 and c.events == {"text_truncated": 1}
    assert c.examples[0]["source"].endswith("d.jsonl:line 3")  # line numbers count the blank line
    assert "pos_text" in c.examples[1]["detail"] and "expected a string, got int" in c.examples[2]["detail"]
    with pytest.raises(DataError, match=r"d\.jsonl:line 3: line 3 is not valid JSON"):
        ds.get(1, SkipCounter(strict=True))


def test_bad_rows_replaced_deterministically_in_batches(tmp_path):
    for i in range(8):
        make_image(tmp_path / "images" / f"{i}.png")
    rows = [train_row(i) for i in range(8)]
    rows[2]["qry_image_path"] = "images/missing.png"
    rows[3]["pos_text"] = None
    write_parquet(rows, tmp_path / "d.parquet")
    ds = SampleDataset(DatasetSpec("d", [tmp_path / "d.parquet"]))
    batches = TrainBatches([ds], MixtureSampler([8], global_batch_size=8, shuffle=False))
    samples, c = batches.samples(0)
    assert len(samples) == 8  # size kept: rows 2 and 3 are replaced by the next good row (4)
    assert [s.positive.text for s in samples] == [f"label {i}" for i in (0, 1, 4, 4, 4, 5, 6, 7)]
    assert c.skipped == {"image_missing": 1, "missing_field": 2} and c.good == 8 and c.read == 11
    with pytest.raises(DataError, match="d.parquet:row 3: "):  # rows[2], 1-based
        TrainBatches([ds], MixtureSampler([8], global_batch_size=8, shuffle=False), strict=True).samples(0)


class _PickyProcessor(FakeProcessor):
    """Rejects any side whose text contains 'label 3' (like a processor refusing too many images)."""

    def __call__(self, sides):
        for s in sides:
            if s.text and "label 3" in s.text:
                raise ValueError("row has too many images")
        return super().__call__(sides)


def test_processor_rejection_is_a_counted_skip_in_both_readers(tmp_path):
    src = make_train_set(tmp_path / "src", 8)
    ds = SampleDataset(DatasetSpec("d", [src]))
    picky = Collator(_PickyProcessor(), 0)
    b = TrainBatches([ds], MixtureSampler([8], global_batch_size=8, shuffle=False), collate=picky)[0]
    assert b["target"]["input_ids"].shape[0] == 8  # size kept: row 3 replaced by row 4
    assert b["skips"]["skipped"] == {"processor_error": 1} and b["skips"]["good"] == 8 and b["skips"]["read"] == 9
    assert "too many images" in b["skips"]["examples"][0]["detail"]

    spec = importlib.util.spec_from_file_location("convert_to_wds", ROOT / "tools" / "convert_to_wds.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.convert(src, tmp_path / "s", shard_size=4)
    loader = WdsLoader(WdsStream(list_shards(tmp_path / "s")[0], batch_size=3, shardshuffle=False, collate=picky))
    batches = list(loader)
    assert [x["target"]["input_ids"].shape[0] for x in batches] == [3, 3, 1]  # 7 good samples, full batches first
    assert loader.skips.skipped == {"processor_error": 1} and loader.skips.read == 8 and loader.skips.good == 7

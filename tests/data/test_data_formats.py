"""Readers: MMEB-train/eval/instructed and pairs rows -> Sample/EvalExample, instructions, placeholders."""

from __future__ import annotations

import pytest
from PIL import Image

from mmembed.data import (
    DatasetSpec,
    Instructions,
    ParseOptions,
    SampleDataset,
    SkipCounter,
    detect_format,
    load_manifest,
    read_eval_set,
    resolve_datasets,
)
from tests.data.data_helpers import make_image, make_train_set, train_row, write_jsonl, write_parquet


def test_mmeb_train_parquet_and_jsonl_read_the_same(tmp_path):
    make_train_set(tmp_path, 3)
    write_jsonl([train_row(i) for i in range(3)], tmp_path / "ds.jsonl")
    for name in ("ds.parquet", "ds.jsonl"):
        ds = SampleDataset(DatasetSpec(name="ds", files=[tmp_path / name]), placeholder="<img>")
        s = ds.parse(1)
        assert s.query.text == "<img> Represent the given image for classification. item 1"
        assert s.query.instruction is None  # inline instruction kept as text
        assert s.query.images == [str(tmp_path / "images" / "1.png")]  # relative to the data file's folder
        assert s.positive.text == "label 1" and s.positive.images == []
        assert [n.text for n in s.negatives] == ["wrong 1"]
        assert s.source.startswith(str(tmp_path / name)) and s.dataset == "ds"
        loaded = ds.load(1)
        assert isinstance(loaded.query.images[0], Image.Image) and loaded.query.images[0].mode == "RGB"


def test_mmeb_placeholder_dropped_without_image_and_list_negatives(tmp_path):
    img = make_image(tmp_path / "a.png")
    row = {
        "qry": "<|image_1|> Find a caption: dogs",
        "qry_image_path": "",
        "pos_text": "<|image_1|> Represent the given image.",
        "pos_image_path": "a.png",
        "neg_text": ["<|image_1|> Represent the given image.", "text neg"],
        "neg_image_path": ["a.png", ""],
    }
    write_parquet([row], tmp_path / "t.parquet")
    s = SampleDataset(DatasetSpec("t", [tmp_path / "t.parquet"])).parse(0)
    assert s.query.text == "Find a caption: dogs" and s.query.images == []
    assert s.positive.text == "<image> Represent the given image." and s.positive.images == [img]
    assert [(n.text, n.images) for n in s.negatives] == [
        ("<image> Represent the given image.", [img]),
        ("text neg", []),
    ]


def test_image_root_override(tmp_path):
    make_image(tmp_path / "imgs" / "images" / "0.png")
    write_parquet([train_row(0)], tmp_path / "data" / "d.parquet")
    spec = resolve_datasets(tmp_path / "data" / "d.parquet", image_root=tmp_path / "imgs")[0]
    s = SampleDataset(spec).load(0)
    assert isinstance(s.query.images[0], Image.Image)


def test_eval_plain_and_instructed(tmp_path):
    plain = {
        "qry_text": "<|image_1|> Classify: ",
        "qry_img_path": "q.png",
        "tgt_text": ["cat", "dog"],
        "tgt_img_path": ["", ""],
    }
    inst = {
        "qry_inst": "Find an image.",
        "qry_text": "a cat",
        "qry_img_path": "",
        "tgt_inst": "Represent the given image.",
        "tgt_text": ["<|image_1|>", "<|image_1|>"],
        "tgt_img_path": ["c.png", "q.png"],
    }
    write_parquet([plain], tmp_path / "ev" / "plain.parquet")
    write_jsonl([inst], tmp_path / "ev" / "inst.jsonl")
    make_image(tmp_path / "ev" / "q.png")
    make_image(tmp_path / "ev" / "c.png")
    sets = read_eval_set(tmp_path / "ev", placeholder="<image>")
    p = sets["plain"][0]
    # V1 rows keep their text as it is, trailing space included (#13): VLM2Vec-V1's EvalDataset (src/dataset.py, v1
    # branch) only swaps the image token, and a last-token-pooled model sees the trailing whitespace
    assert p.query.text == "<image> Classify: " and p.positive == 0
    assert [c.text for c in p.candidates] == ["cat", "dog"]
    i = sets["inst"][0]
    assert i.query.instruction == "Find an image." and i.query.text == "a cat" and i.query.images == []
    assert i.candidates[0].images == [str(tmp_path / "ev" / "c.png")] and i.candidates[0].text == "<image>"
    assert all(c.instruction == "Represent the given image." for c in i.candidates)
    assert len(set(i.candidate_keys)) == 2


def test_eval_bad_rows_skipped(tmp_path):
    rows = [
        {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]},
        {"qry_text": "q", "qry_img_path": "", "tgt_text": "a", "tgt_img_path": ""},  # mistyped candidates
        {"qry_text": "q", "qry_img_path": "missing.png", "tgt_text": ["a"], "tgt_img_path": [""]},
        {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": [""]},  # length mismatch
    ]
    write_jsonl(rows, tmp_path / "e.jsonl")
    c = SkipCounter()
    out = read_eval_set(tmp_path / "e.jsonl", counter=c)
    assert len(out["e"]) == 1
    assert c.read == 4 and c.good == 1 and c.num_skipped == 3
    assert c.skipped == {"bad_field": 2, "image_missing": 1}


def test_pairs_jsonl_schema(tmp_path):
    img = make_image(tmp_path / "x.jpg")
    rows = [
        {"query": "plain text query", "positive": {"image": "x.jpg"}},
        {
            "query": {"text": "what is it?", "images": ["x.jpg"], "instruction": "Answer."},
            "positive": {"text": "a red square", "instruction": "Represent the answer."},
            "negatives": ["a blue circle", {"text": "<|image_1|> other", "image": "x.jpg"}],
        },
    ]
    write_jsonl(rows, tmp_path / "p.jsonl")
    ds = SampleDataset(DatasetSpec("p", [tmp_path / "p.jsonl"]))
    a, b = ds.parse(0), ds.parse(1)
    assert a.query.text == "plain text query" and a.positive.images == [img] and a.negatives == []
    assert b.query.instruction == "Answer." and b.query.images == [img]
    assert b.positive.instruction == "Represent the answer."
    assert [n.text for n in b.negatives] == ["a blue circle", "<image> other"]


def test_detect_format_names_fields():
    assert detect_format(["qry", "qry_image_path", "pos_text"]) == "mmeb_train"
    assert detect_format(["qry_inst", "qry_text", "tgt_inst", "tgt_text"]) == "mmeb_eval_instruct"
    with pytest.raises(ValueError, match="cannot tell the format.*'foo'"):
        detect_format(["foo"], "x.parquet")


def test_manifest_instructions_strip_inline_and_paraphrases(tmp_path):
    make_train_set(tmp_path, 40)
    (tmp_path / "m.yaml").write_text(
        "datasets:\n"
        "  - name: cls\n"
        "    path: ds.parquet\n"
        "    cap: 30\n"
        "    query_instruction: ['Classify the image.', 'What is this?', 'Name the object.']\n"
        "    target_instruction: Represent the label.\n"
        "    inline_instruction: Represent the given image for classification.\n"
    )
    spec = load_manifest(tmp_path / "m.yaml")[0]
    ds = SampleDataset(spec, seed=3)
    assert len(ds) == 30  # cap
    s = ds.parse(0)
    assert s.query.text == "<image> item 0"  # inline instruction removed, placeholder kept
    assert s.query.instruction in spec.instructions.query
    assert s.positive.instruction == "Represent the label." and s.negatives[0].instruction == "Represent the label."
    picks = [ds.parse(i).query.instruction for i in range(30)]
    assert len(set(picks)) == 3  # several paraphrases are used
    assert picks == [SampleDataset(spec, seed=3).parse(i).query.instruction for i in range(30)]  # deterministic
    assert picks != [SampleDataset(spec, seed=4).parse(i).query.instruction for i in range(30)]  # seeded


def test_manifest_errors_name_the_entry(tmp_path):
    make_train_set(tmp_path, 1)
    (tmp_path / "bad.yaml").write_text("datasets:\n  - path: ds.parquet\n    wieght: 2\n")
    with pytest.raises(ValueError, match=r"datasets\[0\].*'wieght'.*Did you mean 'weight'"):
        load_manifest(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("datasets:\n  - path: nope.parquet\n")
    with pytest.raises(FileNotFoundError, match="nope.parquet does not exist"):
        load_manifest(tmp_path / "bad2.yaml")


def test_instructions_row_instruction_wins():
    from mmembed.data.sample import Side

    ins = Instructions(query=["Q"], target=["T"])
    q, t = ins.apply(Side("own", "x"), [Side(None, "y")], seed=0, dataset="d", index=0, placeholder="<image>")
    assert q.instruction == "own" and t[0].instruction == "T"


def test_multi_image_side_and_eval_manifest_instructions(tmp_path):
    a, b = make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png")
    row = {**train_row(0), "qry": "<|image_1|> vs <|image_2|>: same?", "qry_image_path": ["a.png", "b.png"]}
    write_parquet([row], tmp_path / "m.parquet")
    s = SampleDataset(DatasetSpec("m", [tmp_path / "m.parquet"])).parse(0)
    assert s.query.images == [a, b] and s.query.text == "<image> vs <image>: same?"
    write_jsonl([{"qry_text": "<|image_1|>", "qry_img_path": "a.png", "tgt_text": ["x", "y"]}], tmp_path / "e.jsonl")
    (tmp_path / "ev.yaml").write_text(
        "datasets:\n  - path: e.jsonl\n    query_instruction: Classify.\n    target_instruction: Label.\n"
    )
    ex = read_eval_set(tmp_path / "ev.yaml")["e"][0]
    assert ex.query.instruction == "Classify." and [c.instruction for c in ex.candidates] == ["Label.", "Label."]


def test_an_instruction_keeps_no_mmeb_image_placeholder():
    """Regression (#13): mmeb_eval_instruct's qry_inst starts with <|image_1|>; it must not reach the model as text."""
    from mmembed.data.formats import parse_eval_row

    row = {
        "qry_inst": "<|image_1|> Represent the given image for classification.",
        "qry_text": "",
        "qry_img_path": "a.jpg",
        "tgt_inst": "<|image_1|>Represent the answer.",
        "tgt_text": ["cat", "dog"],
        "tgt_img_path": ["", ""],
    }
    ex = parse_eval_row(row, "mmeb_eval_instruct", ParseOptions(image_root="/imgs"))
    assert ex.query.instruction == "Represent the given image for classification."
    assert ex.query.images == ["/imgs/a.jpg"]
    assert [c.instruction for c in ex.candidates] == ["Represent the answer.", "Represent the answer."]

"""Issue #13 A: instructed MMEB eval rows read as VLM2Vec-V2's parser of each family reads them (one test each),
V1 and training rows kept as they are (docs/mmeb_parsing.md §2-3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmembed.data import DatasetSpec, ParseOptions, SampleDataset, read_eval_set
from mmembed.data.formats import parse_eval_row
from mmembed.data.mmeb_rules import FAMILIES, PARSER_OF, family_of, rule_for
from mmembed.eval.tasks import MMEB_V1
from tests.data.data_helpers import write_parquet

ROOT = Path(__file__).resolve().parents[2]


def _row(qry_inst, qry_text, qry_img, tgt_inst, tgt_text, tgt_img):
    return {
        "qry_inst": qry_inst,
        "qry_text": qry_text,
        "qry_img_path": qry_img,
        "tgt_inst": tgt_inst,
        "tgt_text": tgt_text,
        "tgt_img_path": tgt_img,
    }


def _parse(row, dataset, family=None):
    return parse_eval_row(row, "mmeb_eval_instruct", ParseOptions(image_root="/im", dataset=dataset, family=family))


def test_classification_ignores_tgt_inst_and_ends_the_query_with_a_newline():
    """image_cls_dataset.py: candidates are the tgt_text labels alone; the query gets "\\n" (L20)."""
    row = _row(
        "<|image_1|> Represent the given image for classification.",
        "",
        "ImageNet-1K/a.jpg",
        "Represent the class label.",
        ["tench", "goldfish"],
        ["", ""],
    )
    ex = _parse(row, "ImageNet-1K")
    assert ex.query.instruction == "Represent the given image for classification."
    assert ex.query.text == "\n" and ex.query.images == ["/im/ImageNet-1K/a.jpg"]
    assert [(c.instruction, c.text, c.images) for c in ex.candidates] == [(None, "tench", []), (None, "goldfish", [])]
    assert ex.meta["eval_family"] == "image_cls"
    assert _parse(row, "ImageNet_1K").candidates[0].instruction is None  # the training spelling finds it too


def test_vqa_ignores_tgt_inst_and_keeps_the_question_before_the_newline():
    """image_qa_dataset.py: "<tok>\\n" + inst + " " + question, squashed, + "\\n" (L17-20)."""
    row = _row(
        "Represent the given image with the following question:", "What is it? \n", "q.jpg", "Answer:", ["a"], [""]
    )
    ex = _parse(row, "OK-VQA")
    assert ex.query.text == "What is it?\n\n"  # " \n" squashed to "\n", then the suffix
    assert ex.candidates[0].instruction is None and ex.candidates[0].text == "a"
    assert rule_for(None, "OK-VQA").image_newline and not rule_for(None, "N24News").image_newline


def test_image_to_text_retrieval_reads_like_classification():
    row = _row(
        "Find an image caption describing the given image.", "", "c.jpg", "Caption:", ["a dog", "a cat"], ["", ""]
    )
    ex = _parse(row, "MSCOCO_i2t")
    assert ex.query.images == ["/im/c.jpg"] and ex.query.text == "\n"
    assert [c.text for c in ex.candidates] == ["a dog", "a cat"] and all(c.instruction is None for c in ex.candidates)


def test_text_to_image_drops_the_query_image_and_instructs_image_candidates():
    """image_t2i_eval.py: query_images = [None] (L23); image-only candidates "<tok> tgt_inst\\n" (L34-38)."""
    row = _row(
        "Find me an everyday image that matches the given caption:",
        "A cat.",
        "ignored.jpg",
        "<|image_1|> Represent the given image.",
        ["", ""],
        ["x.jpg", "y.jpg"],
    )
    ex = _parse(row, "MSCOCO_t2i")
    assert ex.query.images == [] and ex.query.text == "A cat.\n"
    assert ex.query.instruction == "Find me an everyday image that matches the given caption:"
    assert [(c.instruction, c.text, c.images) for c in ex.candidates] == [
        ("Represent the given image.", "\n", ["/im/x.jpg"]),
        ("Represent the given image.", "\n", ["/im/y.jpg"]),
    ]
    assert _parse(row, "VisDial").query.text == "A cat.\n\n"  # L20-21: VisDial's second newline


def test_text_to_image_with_captions_keeps_instruction_and_caption():
    """WebQA/EDIS: "<tok> tgt_inst caption", squashed, + "\\n" (image_t2i_eval.py L26-33)."""
    row = _row(
        "Find a Wikipedia image that answers:",
        "Who?",
        "",
        "Represent the given image with caption:",
        ["Ada \n", "Bob"],
        ["a.jpg", "b.jpg"],
    )
    ex = _parse(row, "WebQA")
    assert [(c.instruction, c.text) for c in ex.candidates] == [
        ("Represent the given image with caption:", "Ada\n\n"),
        ("Represent the given image with caption:", "Bob\n"),
    ]


def test_grounding_image_candidates_get_no_newline_but_captions_do():
    """image_i2i_vg_dataset.py: image-only candidates are "<tok> tgt_inst" with no "\\n" (L38); captions get one."""
    row = _row(
        "Select the portion of the image that isolates:",
        "the dog",
        "r.jpg",
        "Represent the image.",
        ["", ""],
        ["c0.jpg", "c1.jpg"],
    )
    ex = _parse(row, "RefCOCO")
    assert ex.query.images == ["/im/r.jpg"] and ex.query.text == "the dog\n"
    assert [(c.instruction, c.text, c.images) for c in ex.candidates] == [
        ("Represent the image.", None, ["/im/c0.jpg"]),
        ("Represent the image.", None, ["/im/c1.jpg"]),
    ]
    row["tgt_text"] = ['"a dog"', '"a cat"']
    assert [c.text for c in _parse(row, "RefCOCO-Matching").candidates] == ['"a dog"\n', '"a cat"\n']


def test_unknown_datasets_keep_the_generic_rule_and_family_overrides_the_name():
    row = _row("Classify.", "", "a.jpg", "Represent the answer.", ["cat", "dog"], ["", ""])
    generic = _parse(row, "my_own_set")  # both instructions, no suffix (mmembed's rule before #13)
    assert generic.query.text is None and [c.instruction for c in generic.candidates] == ["Represent the answer."] * 2
    assert "eval_family" not in generic.meta
    assert _parse(row, "my_own_set", family="image_cls").candidates[0].instruction is None
    assert _parse(row, "ImageNet-1K", family="generic").candidates[0].instruction == "Represent the answer."
    with pytest.raises(ValueError, match="unknown eval family 'image_xyz'"):
        _parse(row, "x", family="image_xyz")


def test_v1_rows_and_training_rows_keep_their_text(tmp_path):
    """V1 src/dataset.py and V2 mmeb_dataset.py only swap the image token: newlines reach the model."""
    v1 = {
        "qry_text": "<|image_1|> Represent the given image for classification.\n",
        "qry_img_path": "a.jpg",
        "tgt_text": ["tench\n", "goldfish"],
        "tgt_img_path": ["", ""],
    }
    ex = parse_eval_row(v1, "mmeb_eval", ParseOptions(image_root="/im", dataset="ImageNet-1K"))
    assert ex.query.text == "<image> Represent the given image for classification.\n"  # no V2 suffix added
    assert [c.text for c in ex.candidates] == ["tench\n", "goldfish"]
    train = {
        "qry": "<|image_1|> Represent the given image.\n",
        "qry_image_path": "",  # no image: the marker and the space after it go, the newline stays
        "pos_text": "a cat\n",
        "pos_image_path": "",
    }
    write_parquet([train], tmp_path / "t.parquet")
    s = SampleDataset(DatasetSpec("t", [tmp_path / "t.parquet"])).parse(0)
    assert s.query.text == "Represent the given image.\n" and s.positive.text == "a cat\n"


def test_read_eval_set_applies_the_family_of_the_file_and_manifest(tmp_path):
    row = _row("Classify.", "a headline", "", "Represent the answer.", ["cat", "dog"], ["", ""])
    write_parquet([row], tmp_path / "N24News" / "test-00000-of-00001.parquet")
    write_parquet([row], tmp_path / "mine.parquet")
    assert read_eval_set(tmp_path / "N24News")["N24News"][0].candidates[0].instruction is None
    (tmp_path / "m.yaml").write_text("datasets:\n  - path: mine.parquet\n    family: image_cls\n")
    assert read_eval_set(tmp_path / "m.yaml")["mine"][0].candidates[0].instruction is None


def test_the_family_table_covers_the_36_mmeb_datasets_and_agrees_with_their_meta_tasks():
    assert set(PARSER_OF) == set(MMEB_V1) and len(PARSER_OF) == 36
    allowed = {"CLS": {"image_cls"}, "VQA": {"image_qa"}, "VG": {"image_i2i_vg"}}
    allowed["RET"] = {"image_i2t", "image_t2i", "image_i2i_vg"}
    for name, (meta_task, _) in MMEB_V1.items():
        assert family_of(name) in allowed[meta_task], name
    assert family_of("not_mmeb") is None and "generic" in FAMILIES


def test_the_parsing_doc_lists_every_dataset_and_family():
    doc = (ROOT / "docs" / "mmeb_parsing.md").read_text()
    for name in PARSER_OF:
        assert name in doc, name
    for family in FAMILIES:
        assert f"`{family}`" in doc, family

"""Issue #13 B: the MMEB download layout read as it is (docs/mmeb_parsing.md §4).

Subset folders name the datasets (so scores carry MMEB meta-tasks), ``diverse_instruction`` files are the subset's
paraphrased rows (read instead of ``original`` when asked, as VLM2Vec does), and images are found in an ``images/`` or
``eval_images/`` folder beside the data.
"""

from __future__ import annotations

import json

import pytest

from mmembed.data import SampleDataset, load_manifest, read_eval_set, resolve_datasets
from tests.data.data_helpers import make_image, train_row, write_parquet
from tests.data.mmeb_layout import CLS_PARAPHRASES, make_mmeb_eval, make_mmeb_train


def test_a_folder_of_subsets_is_one_dataset_per_subset_reading_original(tmp_path):
    train = make_mmeb_train(tmp_path, n=6)
    specs = resolve_datasets(train)
    assert [s.name for s in specs] == ["ImageNet_1K", "MSCOCO_t2i"]  # images/ is not a subset
    cls = specs[0]
    assert cls.split == "original" and cls.files == [train / "ImageNet_1K" / "original-00000-of-00001.parquet"]
    # the paraphrase file belongs to its subset: recognised, not a dataset of its own, not mixed in
    assert cls.paraphrases == [train / "ImageNet_1K" / "diverse_instruction-00000-of-00001.parquet"]
    assert set(cls.splits) == {"original", "diverse_instruction"}
    # rows name images/ImageNet_1K/i.png: relative to the folder holding images/ (VLM2Vec's --image_dir MMEB-train/)
    assert cls.image_root == train
    s = SampleDataset(cls).load(0)
    assert s.query.text == "<image> Represent the given image for classification.\n"  # kept as VLM2Vec keeps it
    assert s.dataset == "ImageNet_1K" and s.positive.text == "red"
    assert s.query.images[0].size == (16, 16)  # found and decoded


def test_diverse_instruction_rows_replace_the_original_ones_when_chosen(tmp_path):
    """VLM2Vec trains on split_name=diverse_instruction *instead of* original (v1 src/dataset.py L39)."""
    make_mmeb_train(tmp_path, n=6)
    (tmp_path / "m.yaml").write_text(
        "datasets:\n  - path: MMEB-train\n    split: diverse_instruction\n    subsets: [ImageNet_1K]\n    cap: 4\n"
    )
    (spec,) = load_manifest(tmp_path / "m.yaml")
    assert spec.name == "ImageNet_1K" and spec.split == "diverse_instruction" and spec.paraphrases == []
    ds = SampleDataset(spec)
    assert len(ds) == 4  # cap per subset
    original = SampleDataset(resolve_datasets(tmp_path / "MMEB-train")[0])
    for i in range(4):
        para, orig = ds.parse(i), original.parse(i)
        # this row's instruction comes from the paraphrase file; its image and target are the original row's
        assert para.query.text == CLS_PARAPHRASES[i % 2].replace("<|image_1|>", "<image>")
        assert para.query.text != orig.query.text
        assert para.query.images == orig.query.images and para.positive == orig.positive


def test_eval_download_names_sets_by_subset_with_their_meta_task(tmp_path):
    from mmembed.eval.protocol import evaluate
    from mmembed.eval.run import load_eval_sets
    from tests.eval.helpers import ConstantModel

    ev = make_mmeb_eval(tmp_path)
    sets = load_eval_sets(ev)  # no manifest, no --image-root
    assert sorted(sets) == ["ImageNet-1K", "MSCOCO_t2i"]
    assert not any(ex.meta.get("missing_images") for rows in sets.values() for ex in rows)  # eval_images/ found
    assert sets["ImageNet-1K"][0].query.images == [str(ev / "eval_images" / "ImageNet-1K" / "0.png")]
    scores = evaluate(ConstantModel(), sets)
    assert scores["datasets"]["ImageNet-1K"]["meta_task"] == "CLS"
    assert scores["datasets"]["ImageNet-1K"]["split"] == "IND"
    assert scores["datasets"]["MSCOCO_t2i"]["meta_task"] == "RET"
    assert set(scores["meta_tasks"]) == {"CLS", "RET"}


def test_one_subset_folder_one_split_file_and_the_converter_layout(tmp_path):
    ev = make_mmeb_eval(tmp_path)
    assert [s.name for s in resolve_datasets(ev / "ImageNet-1K")] == ["ImageNet-1K"]
    (spec,) = resolve_datasets(ev / "ImageNet-1K" / "test-00000-of-00001.parquet")
    assert spec.name == "ImageNet-1K" and spec.image_root == ev / "eval_images"  # the folder above holds it
    conv = tmp_path / "conv"
    (conv / "N24News" / "test").mkdir(parents=True)
    (ev / "ImageNet-1K" / "test-00000-of-00001.parquet").rename(conv / "N24News" / "test" / "0000.parquet")
    (spec,) = resolve_datasets(conv)
    assert (
        spec.name == "N24News" and spec.split == "test" and spec.files == [conv / "N24News" / "test" / "0000.parquet"]
    )


def test_image_root_default_picks_images_beside_the_data_else_the_old_folder(tmp_path):
    # images/ beside the data, paths relative to it
    a = tmp_path / "a"
    make_image(a / "images" / "x" / "0.png")
    write_parquet([train_row(0, image="x/0.png")], a / "d.parquet")
    (spec,) = resolve_datasets(a)
    assert spec.image_root == a / "images" and SampleDataset(spec).parse(0).query.images == [str(a / "images/x/0.png")]
    # no images/ folder: the old behaviour, each file's own folder
    b = tmp_path / "b"
    make_image(b / "pics" / "0.png")
    write_parquet([train_row(0, image="pics/0.png")], b / "d.parquet")
    (spec,) = resolve_datasets(b)
    assert spec.image_root is None and SampleDataset(spec).parse(0).query.images == [str(b / "pics" / "0.png")]
    # paths written relative to the data file's folder stay so when images/ is there too (the demo set's layout)
    c = tmp_path / "c"
    make_image(c / "images" / "0.png")
    write_parquet([train_row(0, image="images/0.png")], c / "d.parquet")
    assert resolve_datasets(c)[0].image_root is None
    # an explicit image root wins, and a manifest entry gets the same default
    assert resolve_datasets(a, image_root=tmp_path / "elsewhere")[0].image_root == tmp_path / "elsewhere"
    (tmp_path / "m.yaml").write_text("datasets:\n  - path: a/d.parquet\n")
    assert load_manifest(tmp_path / "m.yaml")[0].image_root == a / "images"


def test_split_choice_and_layout_errors_name_what_was_found(tmp_path):
    sub = tmp_path / "S"
    for split in ("train", "original"):
        write_parquet([train_row(0)], sub / f"{split}-00000-of-00001.parquet")
    assert resolve_datasets(sub)[0].split == "original"  # the older train-* copy is not read twice
    odd = tmp_path / "odd"
    for split in ("alpha", "beta"):
        write_parquet([train_row(0)], odd / f"{split}-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"alpha, beta; pick one with a manifest 'split:'"):
        resolve_datasets(odd)
    only = tmp_path / "root" / "P"
    write_parquet([train_row(0)], only / "diverse_instruction-00000-of-00001.parquet")
    assert resolve_datasets(tmp_path / "root")[0].split == "diverse_instruction"  # the only split there is
    make_mmeb_train(tmp_path, n=2)
    bad = {
        "split: nope": r"has no split 'nope' \(found: diverse_instruction, original\)",
        "subsets: [ImageNet_1K, NoSuch]": r"no subset folder NoSuch",
        "name: one": r"'name' names one dataset, but .* holds 2 subsets",
        "family: image_xyz": r"datasets\[0\]\.family: expected one of image_cls",
    }
    for line, message in bad.items():
        (tmp_path / "m.yaml").write_text(f"datasets:\n  - path: MMEB-train\n    {line}\n")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_manifest(tmp_path / "m.yaml")


def test_a_manifest_folder_of_plain_files_is_still_one_dataset(tmp_path):
    for i in range(2):
        write_parquet([train_row(i)], tmp_path / "ds" / f"part{i}.parquet")
    (tmp_path / "m.yaml").write_text("datasets:\n  - path: ds\n")
    (spec,) = load_manifest(tmp_path / "m.yaml")
    assert spec.name == "ds" and len(spec.files) == 2 and spec.split is None


def test_eval_v1_rows_of_a_download_keep_their_text(tmp_path):
    ev = make_mmeb_eval(tmp_path)
    ex = read_eval_set(ev)["ImageNet-1K"][0]
    assert ex.query.text == "<image> Represent the given image for classification.\n" and ex.query.instruction is None
    assert [c.text for c in ex.candidates] == ["red", "green", "blue", "yellow"]


@pytest.mark.usefixtures("torch_extensions_dir")
def test_mmeb_download_trains_and_evaluates_with_no_manifest(tmp_path):
    from tests.train.conftest import run_train, train_overrides

    train, ev = make_mmeb_train(tmp_path, n=8), make_mmeb_eval(tmp_path)
    out = tmp_path / "run"
    extra = {"data.train": str(train), "data.eval": str(ev), "train.max_steps": 2, "train.eval_every": 2}
    extra["train.export"] = False  # only the metrics are checked
    proc = run_train(train_overrides(tmp_path, out, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped"] == 0  # every training image found through the images/ default
    assert {"eval/ImageNet-1K/hit@1", "eval/MSCOCO_t2i/hit@1", "eval/CLS", "eval/RET"} <= set(last)
    assert 0.0 <= last["eval/ImageNet-1K/hit@1"] <= 1.0


def test_training_on_an_ood_eval_subset_warns_naming_it(tmp_path, caplog, processor):
    from mmembed.config import DataCfg
    from mmembed.data import build_train_batches

    train = make_mmeb_train(tmp_path, n=4)
    write_parquet(
        [train_row(0, image="images/ImageNet_1K/0.png")], train / "ImageNet-A" / "original-00000-of-00001.parquet"
    )
    with caplog.at_level("WARNING", logger="mmembed.data.build"):
        build_train_batches(DataCfg(train=str(train)), processor, global_batch_size=2)
    assert "ImageNet-A" in caplog.text and "subsets:" in caplog.text and "ImageNet_1K," not in caplog.text
    caplog.clear()
    (tmp_path / "m.yaml").write_text("datasets:\n  - path: MMEB-train\n    subsets: [ImageNet_1K, MSCOCO_t2i]\n")
    with caplog.at_level("WARNING", logger="mmembed.data.build"):
        build_train_batches(DataCfg(train=str(tmp_path / "m.yaml")), processor, global_batch_size=2)
    assert "out-of-distribution" not in caplog.text

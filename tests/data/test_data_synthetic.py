"""The built-in demo set: formats, determinism, instruction-dependent answers, chance levels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmembed.data import SampleDataset, load_manifest, read_eval_set
from mmembed.data.synthetic import TASKS, generate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    generate(out, n_train=40, n_eval=12, seed=0, image_size=32)
    return out


def test_layout_and_meta(demo):
    meta = json.loads((demo / "meta.json").read_text())
    assert set(meta["tasks"]) == set(TASKS)
    for task, t in meta["tasks"].items():
        assert t["chance"] == pytest.approx(1 / t["num_candidates"]) and t["num_queries"] == 12
        assert t["meta_task"] in ("CLS", "VQA", "RET", "VG")
        cols = pq.read_schema(demo / "train" / f"{task}.parquet").names
        assert cols == ["qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"]
        ecols = pq.read_schema(demo / "eval" / f"{task}.parquet").names
        assert ecols == ["qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"]
    assert {m["meta_task"] for m in meta["tasks"].values()} == {"CLS", "VQA", "RET", "VG"}


def test_deterministic(demo, tmp_path):
    generate(tmp_path, n_train=40, n_eval=12, seed=0, image_size=32)
    for rel in ("train/caption_t2i.parquet", "eval/grounding.parquet", "train/images/000007.png", "meta.json"):
        a, b = (demo / rel).read_bytes(), (tmp_path / rel).read_bytes()
        assert a == b or rel == "meta.json" and json.loads(a)["tasks"] == json.loads(b)["tasks"]
    generate(tmp_path / "other", n_train=40, n_eval=12, seed=1, image_size=32)
    assert (tmp_path / "other/train/color_cls.parquet").read_bytes() != (demo / "train/color_cls.parquet").read_bytes()


def test_instruction_changes_the_answer(demo):
    color = pq.read_table(demo / "train" / "color_cls.parquet").to_pylist()
    shape = pq.read_table(demo / "train" / "shape_cls.parquet").to_pylist()
    for c, s in zip(color, shape):
        assert c["qry_image_path"] == s["qry_image_path"]  # the same image ...
        assert c["pos_text"] != s["pos_text"]  # ... different positives
    vqa = read_eval_set(demo / "eval" / "attribute_vqa.parquet")["attribute_vqa"]
    for ex in vqa:
        texts = [c.text for c in ex.candidates]
        assert len(set(texts)) == len(texts) == 10
    # the candidates include answers to the other questions about the same image (the trap)
    row = pq.read_table(demo / "eval" / "attribute_vqa.parquet").to_pylist()[0]
    shape_row = pq.read_table(demo / "eval" / "shape_cls.parquet").to_pylist()[0]
    color_row = pq.read_table(demo / "eval" / "color_cls.parquet").to_pylist()[0]
    assert {shape_row["tgt_text"][0], color_row["tgt_text"][0]} <= set(row["tgt_text"])


def test_readers_load_everything(demo):
    for spec in load_manifest(demo / "train.yaml"):
        ds = SampleDataset(spec, placeholder="<image>")
        for i in range(len(ds)):
            s = ds.load(i)  # no bad rows: every image exists and decodes
            assert len(s.negatives) == 1
    sets = read_eval_set(demo / "eval")
    assert set(sets) == set(TASKS) and all(len(v) == 12 for v in sets.values())
    g = sets["grounding"][0]
    assert g.query.instruction.startswith("Select the portion") and len(g.candidates[0].images) == 1
    t2i = sets["caption_t2i"][0]
    assert t2i.query.images == [] and t2i.query.text.startswith("a ") and len(set(t2i.candidate_keys)) == 10


def test_cli(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mmembed.data.synthetic", "--out", str(tmp_path), "--n-train", "20", "--n-eval", "12"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "chance 0.100" in r.stdout and (tmp_path / "train.yaml").is_file()


def test_repo_demo_manifest_matches_generator():
    specs = (ROOT / "data" / "demo.yaml").read_text()
    for task in TASKS:
        assert f"path: demo/train/{task}.parquet" in specs

"""Issue 3's end-to-end data checks through the real training loop: MMEB parquet with an image folder
trains and evaluates with no conversion step, and its webdataset conversion gives the same loss curve."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train.conftest import ROOT, run_train, train_overrides

pytestmark = pytest.mark.usefixtures("torch_extensions_dir")


def _losses(out):
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_parquet_and_its_shards_train_to_the_same_loss_curve(demo_data, tmp_path):
    src = demo_data / "train" / "color_cls.parquet"
    shards = tmp_path / "shards"
    conv = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_to_wds.py"),
            str(src),
            "--out",
            str(shards),
            "--shard-size",
            "16",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert list(shards.glob("*.tar"))
    common = {"data.shuffle_buffer": 0, "data.group_by_length": False, "train.max_steps": 4, "data.eval": ""}
    a = run_train(train_overrides(demo_data, tmp_path / "parquet", **common, **{"data.train": str(src)}))
    b = run_train(train_overrides(demo_data, tmp_path / "wds", **common, **{"data.train": str(shards)}))
    assert a.returncode == 0, a.stderr[-3000:]
    assert b.returncode == 0, b.stderr[-3000:]
    la, lb = _losses(tmp_path / "parquet"), _losses(tmp_path / "wds")
    assert len(la) == 4 and la == lb


def test_mmeb_parquet_folder_trains_and_evaluates_without_conversion(demo_data, tmp_path):
    """data.train is a plain directory of MMEB-train parquet files (images/ beside them), data.eval likewise."""
    out = tmp_path / "run"
    proc = run_train(train_overrides(demo_data, out, **{"data.train": str(demo_data / "train"), "train.eval_every": 4}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    tasks = {k for k in last if k.startswith("eval/") and k.endswith("/hit@1")}
    assert {"eval/color_cls/hit@1", "eval/grounding/hit@1", "eval/caption_t2i/hit@1"} <= tasks
    assert 0.0 <= last["eval/mean_hit@1"] <= 1.0


def test_bad_samples_in_training_are_skipped_counted_and_logged(demo_data, tmp_path):
    imgs = sorted((demo_data / "train" / "images").glob("*.png"))[:6]
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "empty.png").write_bytes(b"")
    rows = [{"query": f"a caption {i}", "positive": {"image": str(p)}} for i, p in enumerate(imgs)]
    rows += [
        {"query": "missing", "positive": {"image": str(tmp_path / "nope.png")}},
        {"query": "broken", "positive": {"image": str(tmp_path / "broken.png")}},
        {"query": "empty", "positive": {"image": str(tmp_path / "empty.png")}},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json}\n")
    out = tmp_path / "run"
    proc = run_train(
        train_overrides(demo_data, out, **{"data.train": str(data), "data.eval": "", "data.num_negatives": 0})
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and metrics[-1]["skipped"] >= 3
    assert [m["skipped"] for m in metrics] == sorted(m["skipped"] for m in metrics)  # cumulative
    assert "skipped" in proc.stdout  # the end-of-run summary
    strict = run_train(
        train_overrides(
            demo_data, tmp_path / "strict", **{"data.train": str(data), "data.eval": "", "data.strict": True}
        )
    )
    assert strict.returncode == 2 and "data error" in strict.stderr and "pairs.jsonl" in strict.stderr
    assert "Traceback" not in strict.stderr

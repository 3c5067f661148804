"""``mmembed eval`` on the real tiny model: reports, cache, and scores independent of how it is run."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mmembed.cli import main
from tests.conftest import make_image
from tests.eval.helpers import scores_without_run_info


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.data_uris = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.data_uris += any(k == "src" and v.startswith("data:image/jpeg;base64,") for k, v in attrs)


def test_reports_and_cache(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = eval_setup
    out = tmp_path / "out"
    args = ["eval", str(model), "--data", str(data), "--out", str(out), "--batch-size", "16", "--examples", "6"]
    assert main(args) == 0
    s = json.loads((out / "scores.json").read_text())
    assert set(s["datasets"]) == {"N24News", "MSCOCO_t2i"}
    t2i = s["datasets"]["MSCOCO_t2i"]
    assert t2i["n"] == 6 and t2i["missing_images"] == 3  # c5 is a candidate of 3 rows (k=3)
    assert s["datasets"]["N24News"]["meta_task"] == "CLS" and t2i["split"] == "IND"
    assert s["model_fingerprint"] and s["date"] and "torch" in s["versions"]
    assert s["encode"]["encoded"] == 12 + 11  # 6 queries + 6 labels; 6 captions + 5 images (c5 missing)
    md = (out / "scores.md").read_text()
    assert "| CLS | N24News | IND | 6 |" in md and "| CLS | RET | IND | Overall |" in md
    page = _Tags()
    page.feed((out / "examples.html").read_text())
    assert page.tags["h2"] == 2 and page.data_uris >= 6
    assert "missing image: c5.png, not scored" in (out / "examples.html").read_text()  # the file, not an index
    # rerun: everything comes from the cache, same numbers
    again = tmp_path / "again"
    args = ["eval", str(model), "--data", str(data), "--out", str(again), "--cache-dir", str(out / "cache")]
    assert main(args) == 0
    s2 = json.loads((again / "scores.json").read_text())
    assert s2["encode"]["encoded"] == 0 and s2["encode"]["cached"] == 23
    assert scores_without_run_info(again / "scores.json") == scores_without_run_info(out / "scores.json")


def test_batch_size_and_workers_do_not_change_scores(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = eval_setup
    runs = {}
    for bs, workers in ((16, 0), (1, 2)):
        out = tmp_path / f"bs{bs}_w{workers}"
        args = ["eval", str(model), "--data", str(data), "--out", str(out), "--no-cache"]
        assert main([*args, "--batch-size", str(bs), "--num-workers", str(workers)]) == 0
        runs[(bs, workers)] = scores_without_run_info(out / "scores.json")
    assert runs[(16, 0)] == runs[(1, 2)]
    assert not (tmp_path / "bs16_w0" / "cache").exists()


def test_cli_errors_exit_2(eval_setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, data = eval_setup
    assert main(["eval", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["eval", str(model), "--data", str(data), "--out", str(tmp_path / "o"), "--datasets", "Nope"]) == 2
    assert "no eval set named Nope" in capsys.readouterr().err


def test_an_undecodable_image_is_a_counted_miss_named_by_file_and_line(
    eval_setup: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """Issue 17: a corrupt image no longer aborts the eval; it is scored like a missing one and named."""
    import shutil

    model, data = eval_setup
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data" / "img" / "0.png").write_bytes(b"not a png at all")
    args = ["eval", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--datasets", "N24News"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "eval set 'N24News': 1 row(s) with an unreadable image, scored as misses" in err
    assert "N24News.jsonl:line 1" in err and "0.png" in err
    d = json.loads((tmp_path / "o" / "scores.json").read_text())["datasets"]["N24News"]
    assert d["n"] == 6 and d["unreadable_images"] == 1 and d["missing_images"] == 1
    clean = tmp_path / "clean"
    assert main(["eval", str(model), "--data", str(data), "--out", str(clean), "--datasets", "N24News"]) == 0
    ok = json.loads((clean / "scores.json").read_text())["datasets"]["N24News"]
    # the bad row is a miss in the denominator: it can only lower the score, by at most 1/6
    assert ok["hit@1"] - 1 / 6 - 1e-9 <= d["hit@1"] <= ok["hit@1"]
    # the fixed file is encoded on the next run (an unreadable input is never cached)
    make_image(0).save(tmp_path / "data" / "img" / "0.png")
    again = tmp_path / "again"
    args = ["eval", str(model), "--data", str(tmp_path / "data"), "--out", str(again), "--datasets", "N24News"]
    assert main([*args, "--cache-dir", str(tmp_path / "o" / "cache")]) == 0
    d2 = json.loads((again / "scores.json").read_text())
    assert d2["datasets"]["N24News"]["unreadable_images"] == 0 and d2["encode"]["encoded"] == 1

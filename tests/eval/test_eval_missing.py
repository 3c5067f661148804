"""An eval that would score nothing is an error; a partial one warns; open_clip baselines say what they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmembed.cli import main
from mmembed.eval import evaluate, load_eval_sets, run_eval
from mmembed.eval.checks import MissingImages
from tests.eval.helpers import OracleModel, known_set, t2i_set
from tests.eval.test_eval_openclip import tiny_clip_json  # noqa: F401 - fixture


def test_all_images_missing_is_an_error_naming_dataset_count_path_and_image_root(tmp_path: Path) -> None:
    t2i_set(tmp_path, n=4, k=3, name="t2i")
    known_set(tmp_path, n=4, k=2, name="text_only", images=False)  # no image rows: never an error
    shutil.rmtree(tmp_path / "img")
    model = OracleModel()
    with pytest.raises(MissingImages) as e:
        evaluate(model, load_eval_sets(tmp_path))
    msg = str(e.value)
    assert "eval set 't2i'" in msg and "all 4 row(s) with an image" in msg and "--image-root" in msg
    assert str(tmp_path / "img" / "c0.png") in msg and "\n" not in msg
    assert model.calls == []  # checked before anything is encoded
    assert isinstance(e.value, ValueError)  # what `mmembed eval` turns into exit 2
    assert evaluate(OracleModel(), load_eval_sets(tmp_path, datasets=["text_only"]))["overall"] == 1.0


def test_the_cli_exits_2_with_one_line(eval_setup: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    model, data = eval_setup
    shutil.copytree(data, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "img")
    args = ["eval", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mmembed: error:")]
    assert len(err) == 1 and "eval set 'MSCOCO_t2i'" in err[0] and "--image-root" in err[0]
    assert not (tmp_path / "o" / "scores.json").exists()


def test_some_images_missing_warns_once_per_dataset_and_keeps_the_mmeb_rule(tmp_path: Path, capsys) -> None:
    known_set(tmp_path, n=6, k=4, name="a")
    t2i_set(tmp_path, n=6, k=3, name="b")
    (tmp_path / "img" / "2.png").unlink()
    (tmp_path / "img" / "c1.png").unlink()  # a candidate of 3 rows of b
    s = evaluate(OracleModel(), load_eval_sets(tmp_path))
    err = capsys.readouterr().err.splitlines()
    warn_a = [ln for ln in err if "eval set 'a'" in ln]
    warn_b = [ln for ln in err if "eval set 'b'" in ln]
    assert len(warn_a) == 1 and "1 of 6 row(s)" in warn_a[0] and str(tmp_path / "img" / "2.png") in warn_a[0]
    assert len(warn_b) == 1 and "3 of 6 row(s)" in warn_b[0] and str(tmp_path / "img" / "c1.png") in warn_b[0]
    assert s["datasets"]["a"]["n"] == 6 and s["datasets"]["a"]["hit@1"] == pytest.approx(5 / 6)
    assert len(s["warnings"]) == 2


def test_all_unreadable_or_missing_is_an_error_too(tmp_path: Path) -> None:
    known_set(tmp_path, n=4, k=2, name="cls")
    (tmp_path / "img" / "0.png").unlink()
    for i in (1, 2, 3):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"not an image at all")
    with pytest.raises(MissingImages, match=r"all 4 row\(s\).*1 missing, 3 unreadable.*--image-root"):
        evaluate(OracleModel(), load_eval_sets(tmp_path))


class _Fingerprinted(OracleModel):
    fingerprint = "oracle-test"


def test_progress_lines_name_each_dataset_with_rows_and_rate(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MMEMBED_PROGRESS", "lines")
    known_set(tmp_path / "data", n=6, k=4, name="first", images=False)
    known_set(tmp_path / "data", n=5, k=3, name="second", images=False)
    run_eval("oracle", tmp_path / "data", tmp_path / "out", model=_Fingerprinted(), cache_dir=None)
    err = capsys.readouterr().err.splitlines()
    for name, rows in (("first", 12), ("second", 10)):
        lines = [ln for ln in err if ln.startswith(f"encode {name}:")]
        assert lines and f"{rows}/{rows} rows (100%)" in lines[-1] and " rows/s" in lines[-1], err
    s = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert all(d["seconds"] >= 0 and d["encode"]["encoded"] > 0 for d in s["datasets"].values())


def test_openclip_without_a_tag_says_the_weights_are_random(
    eval_setup: tuple[Path, Path],
    tiny_clip_json: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    _, data = eval_setup
    out = tmp_path / "oc"
    assert main(["eval", f"openclip:{tiny_clip_json}", "--data", str(data), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "weights are RANDOM" in err
    md = (out / "scores.md").read_text()
    assert "weights are RANDOM" in md and "**RANDOM weights**" in md
    s = json.loads((out / "scores.json").read_text())
    assert s["model_info"]["random_weights"] is True and any("RANDOM" in w for w in s["warnings"])


def test_openclip_weights_that_cannot_be_downloaded_are_one_line_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    import open_clip.factory
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **kw):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache (offline)")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    known_set(tmp_path / "data", n=2, k=2, images=False)
    args = ["eval", "openclip:RN50:openai", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmembed: error: openclip:RN50:openai:"), err
    assert "could not be downloaded" in err[0] and "offline" in err[0]
    assert main([*args[:1], "openclip:RN50:no-such-tag", *args[2:]]) == 2
    assert "'no-such-tag' is neither a pretrained tag of RN50" in capsys.readouterr().err

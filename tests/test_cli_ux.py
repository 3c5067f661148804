"""The ``mmembed`` command's surface: help with defaults, --version, validate --print-config, compare, and encode's
ids, several images per row, parquet output, file:line errors and refusal to overwrite."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import yaml

import mmembed
from mmembed.cli import build_parser, main
from mmembed.config import load_recipe, to_dict
from tests.conftest import TINY_RECIPE, make_image


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_says_its_default():
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"encode", "train", "validate", "components", "eval", "compare"} <= set(commands)
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"mmembed {name}: {action.dest} has no help"
            optional = action.option_strings and not action.required
            if optional or action.nargs == argparse.ZERO_OR_MORE:
                shown = formatter._get_help_string(action) % vars(action)
                assert "default" in shown.lower(), f"mmembed {name} {action.option_strings}: {shown!r}"
    encode_help = commands["encode"].format_help()
    assert "(default: 32)" in encode_help and "--overwrite" in encode_help and "(default: off)" in encode_help


def test_version_and_train_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mmembed {mmembed.__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "mmembed validate --print-config RECIPE" in out


def test_validate_print_config_shows_every_key_after_overrides(capsys, tmp_path):
    overrides = ["train.lr=2e-5", "model.pooler.type=mean"]
    assert main(["validate", "--print-config", str(TINY_RECIPE), *overrides]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    expected = to_dict(load_recipe(TINY_RECIPE, overrides))
    assert data == expected
    assert data["train"]["lr"] == 2e-5 and data["model"]["pooler"] == {"type": "mean"}
    assert {"max_steps", "save_total_limit", "zero_stage"} <= set(data["train"])  # defaults, not only what is set
    # the printed recipe is itself a recipe that loads to the same config
    (tmp_path / "resolved.yaml").write_text(printed)
    assert to_dict(load_recipe(tmp_path / "resolved.yaml")) == expected


def test_compare_is_wired(tmp_path, capsys):
    for name, value in (("a", 0.25), ("b", 0.5)):
        (tmp_path / name).mkdir()
        scores = {
            "datasets": {"MSCOCO_t2i": {"hit@1": value, "meta_task": "RET"}},
            "meta_tasks": {"RET": {"hit@1": value}},
            "overall": value,
        }
        (tmp_path / name / "scores.json").write_text(json.dumps(scores))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "MSCOCO_t2i" in out and "a" in out and "b" in out


# ----------------------------------------------------------------------------------------------
# encode


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    return tiny_model.save(tmp_path / "model")


def _rows(tmp_path, rows):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for i in range(3):
        make_image(i, size=(40 + 8 * i, 32)).save(tmp_path / "imgs" / f"{i}.png")
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


ROWS = [
    {"id": "q-1", "text": "a red circle", "instruction": "query"},
    {"image": "imgs/0.png"},
    {"id": 7, "text": "compare <image> with <image>", "image": ["imgs/1.png", "imgs/2.png"]},
    {"text": "two images, no placeholders", "image": ["imgs/0.png", "imgs/2.png"], "id": 2.5},
]


def _expected(model_dir, tmp_path):
    loaded = mmembed.load(model_dir)
    images = [None, tmp_path / "imgs/0.png", [tmp_path / "imgs/1.png", tmp_path / "imgs/2.png"]]
    images.append([tmp_path / "imgs/0.png", tmp_path / "imgs/2.png"])
    texts = [r.get("text") for r in ROWS]
    instr = ["Represent the given input.", None, None, None]  # "query" is the saved prompt's name
    return loaded.encode(
        texts=texts, images=[[str(p) for p in i] if isinstance(i, list) else i for i in images], instruction=instr
    )


def test_encode_npy_keeps_ids_and_takes_several_images(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMEMBED_PROGRESS", "lines")
    rows = _rows(tmp_path, ROWS)
    out = tmp_path / "out" / "emb.npy"
    assert main(["encode", str(model_dir), "--input", str(rows), "--output", str(out), "--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert "encode: 4/4 rows (100%)" in err and "rows/s" in err  # mmembed.progress, in rows
    emb = np.load(out)
    assert emb.shape == (4, 64)
    assert json.loads((tmp_path / "out" / "emb.ids.json").read_text()) == ["q-1", 2, 7, 2.5]  # line 2: default id
    np.testing.assert_allclose(emb, _expected(model_dir, tmp_path), atol=1e-5)
    assert not np.allclose(emb[2], emb[3], atol=1e-3)


def test_encode_parquet_has_id_and_embedding_columns(model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(tmp_path, [{"id": i * 10, "text": f"row {i}"} for i in range(5)])
    out = tmp_path / "emb.parquet"
    assert main(["encode", str(model_dir), "--input", str(rows), "--output", str(out), "--batch-size", "2"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "embedding"]
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert table.column("id").to_pylist() == [0, 10, 20, 30, 40]
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    expected = mmembed.load(model_dir).encode(texts=[f"row {i}" for i in range(5)])
    np.testing.assert_allclose(emb, expected, atol=1e-5)


def test_encode_refuses_to_overwrite_without_the_flag(model_dir, tmp_path, capsys):
    rows = _rows(tmp_path, [{"text": "a"}])
    for name in ("e.npy", "e.parquet"):
        out = tmp_path / name
        out.write_bytes(b"keep me")
        args = ["encode", str(model_dir), "--input", str(rows), "--output", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "--overwrite" in err and out.read_bytes() == b"keep me"
        assert main([*args, "--overwrite"]) == 0
        assert out.read_bytes() != b"keep me"
    # the ids file of an .npy output counts as well
    (tmp_path / "f.ids.json").write_text("[]")
    assert main(["encode", str(model_dir), "--input", str(rows), "--output", str(tmp_path / "f.npy")]) == 2
    assert "f.ids.json" in capsys.readouterr().err and not (tmp_path / "f.npy").exists()
    assert main(["encode", str(model_dir), "--input", str(rows), "--output", str(tmp_path / "g.txt")]) == 2
    assert ".npy" in capsys.readouterr().err


def test_encode_errors_name_the_file_and_its_1_based_line(model_dir, tmp_path, capsys):
    def run(text: str) -> str:
        path = tmp_path / "rows.jsonl"
        path.write_text(text)
        assert main(["encode", str(model_dir), "--input", str(path), "--output", str(tmp_path / "e.npy")]) == 2
        return capsys.readouterr().err

    path = tmp_path / "rows.jsonl"
    # the model names row 1 of its call; the CLI names the line (blank lines count)
    err = run('{"text": "ok"}\n\n{"image": "nope.png"}\n')
    assert f"{path}:3: image " in err and "nope.png: file not found" in err and "row 1" not in err
    # beyond the first chunk of 8 batches the line is still right (batch size 1: chunks of 8 rows)
    lines = [json.dumps({"text": f"t{i}"}) for i in range(10)] + ['{"image": "gone.png"}']
    err = run("\n".join(lines) + "\n")
    assert f"{path}:11: image " in err and "gone.png" in err
    assert f"{path}:2: field 'image[1]' must be a string" in run('{"text": "a"}\n{"image": ["a.png", 3]}\n')
    assert f"{path}:2: duplicate id 1 (also on line 1)" in run('{"text": "a"}\n{"text": "b", "id": 1}\n')
    assert f"{path}:1: field 'id' must be a JSON scalar" in run('{"text": "a", "id": [1]}\n')

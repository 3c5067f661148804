"""``mmembed encode`` on a JSONL of mixed rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import mmembed
from mmembed.cli import main
from tests.conftest import ROOT, make_image


def _write_rows(tmp_path):
    (tmp_path / "imgs").mkdir()
    make_image(1).save(tmp_path / "imgs" / "a.png")
    make_image(2, mode="RGBA").save(tmp_path / "imgs" / "b.png")
    make_image(3).convert("CMYK").save(tmp_path / "imgs" / "c.jpg")
    rows = [
        {"text": "a red circle"},
        {"image": "imgs/a.png"},
        {"text": "what color?", "image": "imgs/b.png", "instruction": "Answer the question."},
        {"image": "imgs/c.jpg", "instruction": "Represent the given image."},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows


def test_encode_cli_matches_the_python_api(tiny_model, tmp_path):
    model_dir = tiny_model.save(tmp_path / "model")
    rows_path, rows = _write_rows(tmp_path)
    out = tmp_path / "emb.npy"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmembed.cli",
            "encode",
            str(model_dir),
            "--input",
            str(rows_path),
            "--output",
            str(out),
            "--instruction",
            "Represent the input.",
            "--batch-size",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    emb = np.load(out)
    assert emb.shape == (4, 64)
    loaded = mmembed.load(model_dir)
    expected = loaded.encode(
        texts=[r.get("text") for r in rows],
        images=[str(tmp_path / r["image"]) if "image" in r else None for r in rows],
        instruction=[r.get("instruction", "Represent the input.") for r in rows],
    )
    np.testing.assert_allclose(emb, expected, atol=1e-6)


def test_encode_cli_errors_name_the_line(tiny_model, tmp_path, capsys):
    model_dir = tiny_model.save(tmp_path / "model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    assert main(["encode", str(model_dir), "--input", str(bad), "--output", str(tmp_path / "e.npy")]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n{"image": "nope.png"}\n')
    assert main(["encode", str(model_dir), "--input", str(missing), "--output", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err
    assert f"{missing}:2: image" in err and "nope.png" in err and "file not found" in err  # file:LINE, 1-based
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"text": 3}\n')
    assert main(["encode", str(model_dir), "--input", str(typed), "--output", str(tmp_path / "e.npy")]) == 2
    assert "field 'text' must be a string" in capsys.readouterr().err

"""tools/bench_scale.py: rows parsed from each area script, failures reported, old revisions measured alone."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("_bench_scale", REPO / "tools" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_errors_and_targets(tmp_path: Path) -> None:
    tool = _tool()
    (tmp_path / "sitecustomize.py").write_text(tool.SHIM)
    good = tmp_path / "good.py"
    row = '{"area": "x", "what": "w", "work": 10, "cost": 3.0, "target": 2, "extra": {"ms": [1, 3]}}'
    good.write_text(f"print('noise')\nprint({row!r})\n")
    bad = tmp_path / "bad.py"
    bad.write_text("raise SystemExit('the old code has no such API')\n")
    rows, err = tool.run_area(good, REPO, False, tmp_path, 60)
    assert err == "" and rows == [
        {"area": "x", "what": "w", "work": 10, "cost": 3.0, "target": 2, "extra": {"ms": [1, 3]}}
    ]
    rows_bad, err_bad = tool.run_area(bad, REPO, False, tmp_path, 60)
    assert rows_bad == [] and "exit 1" in err_bad and "no such API" in err_bad
    text = tool.table({"x": rows}, {"x": []}, {"x (old code abc)": err_bad})
    assert "| x | w | x10.0 | x3.00 | n/a | <= 2 MISSED | ms=[1, 3] |" in text
    assert "no such API" in text


def test_old_revision_cannot_borrow_new_modules(tmp_path: Path) -> None:
    """An editable install serves modules missing from PYTHONPATH's copy; the shim stops that."""
    old = tmp_path / "old"
    (old / "mmembed").mkdir(parents=True)
    (old / "mmembed" / "__init__.py").write_text("")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_tool().SHIM)
    probe = "import mmembed, importlib.util as u; print(mmembed.__file__, u.find_spec('mmembed.index') is None)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(shim)])}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, missing = out.stdout.split()
    assert path.startswith(str(old)) and missing == "True"

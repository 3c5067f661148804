"""Growth ratios (work xN -> cost xM) for eval, resume, data memory and search, new and old code side by side (#16).

    python tools/bench_scale.py                           # every area, this checkout
    python tools/bench_scale.py --baseline 76c3275        # ... and the same measurements on an older revision
    python tools/bench_scale.py --quick --only data,search --json scale.json

Each area is a script in ``tools/scale/`` (``<area>_scale.py [--quick]``) that prints one JSON row per measurement:
``{"area", "what", "work", "cost", "extra"}`` and optionally ``"target"`` (the most ``cost`` may be; a ratio below
1 means "faster than the reference"). This driver runs every script in a fresh process from a neutral working
directory with ``PYTHONPATH`` set to the code being measured, so the scripts of *this* checkout measure either
this checkout or, with ``--baseline REV``, a temporary ``git worktree`` of ``REV`` (removed afterwards). The
scripts only use API the older code has too; a script that fails on the older code is reported as such, with
its last error line, and does not stop the others.

``pip install -e`` puts a finder on ``sys.meta_path`` that serves any ``mmembed`` module missing from the
``PYTHONPATH`` copy out of the editable checkout, so an old revision would silently import the new code's new
modules. Every measured process therefore also gets a ``sitecustomize`` (:data:`SHIM`) that removes that finder.

Absolute times on a shared machine are noise; ratios from one run are what this prints. The table's
``target`` column repeats the row's target and whether the current code meets it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "tools" / "scale"
AREAS = ("eval", "resume", "data", "search")
# imported at start-up by every Python process the scripts start (it is on their PYTHONPATH)
SHIM = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", type(f).__module__)]
"""


def run_area(script: Path, code: Path, quick: bool, cwd: Path, timeout: float) -> tuple[list[dict], str]:
    """Runs one ``*_scale.py`` against the package at ``code``; returns (rows, error text or "").

    ``cwd`` holds the :data:`SHIM` ``sitecustomize.py``; it goes on ``PYTHONPATH`` after ``code``.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(cwd)]), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    try:
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s"
    rows = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    if out.returncode:
        tail = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        return rows, f"exit {out.returncode}: {tail[-1] if tail else 'no error output'}"
    if not rows:
        return [], "printed no rows"
    return rows, ""


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached ``git worktree`` of ``rev`` in a temporary folder, removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="mmembed-baseline-"))
    path = tmp / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"x{x:.2f}" if x < 10 else f"x{x:.1f}"


def _extra(extra: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in (extra or {}).items())


def table(new: dict[str, list[dict]], old: dict[str, list[dict]] | None, errors: dict[str, str]) -> str:
    """A Markdown table: one line per (area, what) of the current code, the old code's cost beside it."""
    head = ["area", "what", "work", "cost new", "cost old", "target", "extra (new)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for area, rows in new.items():
        old_by_what = {r["what"]: r for r in (old or {}).get(area, [])}
        for r in rows:
            o = old_by_what.get(r["what"])
            old_cost = _fmt(o["cost"]) if o else ("n/a" if old is not None else "-")
            target = r.get("target")
            verdict = "-" if target is None else f"<= {target:g} {'met' if r['cost'] <= target else 'MISSED'}"
            cells = [r["area"], r["what"], _fmt(r["work"]), _fmt(r["cost"]), old_cost, verdict, _extra(r["extra"])]
            lines.append("| " + " | ".join(cells) + " |")
        if old is not None:  # rows only the old code measured (the new code dropped that path)
            for what, o in old_by_what.items():
                if all(r["what"] != what for r in rows):
                    cells = [o["area"], what, _fmt(o["work"]), "-", _fmt(o["cost"]), "-", _extra(o["extra"])]
                    lines.append("| " + " | ".join(cells) + " |")
    for key, err in errors.items():
        lines.append(f"\n{key}: {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="each script's smaller sizes (minutes, not tens)")
    ap.add_argument("--baseline", metavar="REV", help="also measure this git revision (a temporary worktree)")
    ap.add_argument("--only", default=",".join(AREAS), help=f"comma-separated areas out of {','.join(AREAS)}")
    ap.add_argument("--json", type=Path, help="also write every row (new and old) to this file")
    ap.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per script and revision")
    args = ap.parse_args(argv)
    areas = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in areas if a not in AREAS]
    if unknown:
        ap.error(f"--only: unknown area(s) {unknown}; expected some of {list(AREAS)}")
    missing = [a for a in areas if not (SCALE / f"{a}_scale.py").exists()]
    if missing:
        ap.error(f"no tools/scale/<area>_scale.py for {missing}")
    if args.json and args.json.exists() and not args.overwrite:
        ap.error(f"--json {args.json} exists; pass --overwrite to replace it")

    new: dict[str, list[dict]] = {}
    old: dict[str, list[dict]] | None = None
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mmembed-scale-") as cwd, contextlib.ExitStack() as stack:
        (Path(cwd) / "sitecustomize.py").write_text(SHIM)
        base = stack.enter_context(worktree(args.baseline)) if args.baseline else None
        if base is not None:
            old = {}
        for area in areas:
            script = SCALE / f"{area}_scale.py"
            for label, code, into in (("new", ROOT, new), ("old", base, old)):
                if code is None or into is None:
                    continue
                t0 = time.perf_counter()
                print(f"[bench_scale] {area} on the {label} code ...", file=sys.stderr, flush=True)
                rows, err = run_area(script, code, args.quick, Path(cwd), args.timeout)
                print(
                    f"[bench_scale] {area} ({label}): {len(rows)} rows in {time.perf_counter() - t0:.0f} s"
                    + (f"; {err}" if err else ""),
                    file=sys.stderr,
                    flush=True,
                )
                into[area] = rows
                if err:
                    errors[f"{area} ({label} code{'' if label == 'new' else ' ' + args.baseline})"] = err
    print(table(new, old, errors))
    if args.json:
        args.json.write_text(
            json.dumps({"baseline": args.baseline, "new": new, "old": old, "errors": errors}, indent=1)
        )
    missed = [
        r["what"] for rows in new.values() for r in rows if r.get("target") is not None and r["cost"] > r["target"]
    ]
    failed = [k for k in errors if k.endswith("(new code)")]
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())

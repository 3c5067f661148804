"""Screenshot an ``examples.html`` (or any local page) with headless Chromium.

    python tools/screenshot_examples.py PAGE.html OUT.png [--width 1400] [--height 2400]

Runs ``chromium --headless --screenshot=OUT.png --window-size=W,H file://PAGE``; the browser is found as
``$CHROMIUM``, ``chromium``, ``chromium-browser``, ``google-chrome`` or ``google-chrome-stable`` (Debian:
``apt-get install -y chromium``). ``--no-sandbox`` is added when running as root (containers). Exit 2 when no
browser is found or the screenshot was not written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["find_chromium", "screenshot", "dump_dom", "main"]

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM`` or the first of :data:`CANDIDATES` on ``PATH``; None if none."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def screenshot(page: str | Path, out: str | Path, width: int = 1400, height: int = 2400, timeout: float = 120) -> Path:
    """Write a PNG of ``page`` (``width`` x ``height`` CSS pixels from the top) to ``out``.

    Raises:
        FileNotFoundError: no page or no Chromium.
        RuntimeError: Chromium failed or wrote nothing (its output tail in the message).
    """
    page, out = Path(page).resolve(), Path(out).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"{page}: no such page")
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (apt-get install -y chromium, or set CHROMIUM=/path/to/it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    with tempfile.TemporaryDirectory(prefix="shot-profile-") as profile:
        cmd = [
            exe,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            page.as_uri(),
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file() or out.stat().st_size == 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {tail}")
    return out


def dump_dom(page: str | Path, timeout: float = 120) -> str:
    """The DOM of ``page`` as headless Chromium rendered it (``--dump-dom``): what a reader's browser builds.

    Raises:
        FileNotFoundError: no page or no Chromium.
        RuntimeError: Chromium failed or printed nothing.
    """
    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"{page}: no such page")
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (apt-get install -y chromium, or set CHROMIUM=/path/to/it)")
    with tempfile.TemporaryDirectory(prefix="shot-profile-") as profile:
        cmd = [exe, "--headless", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]
        cmd += [f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or "<html" not in proc.stdout.lower():
        raise RuntimeError(f"chromium printed no DOM (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", help="the HTML page (e.g. OUT/examples.html)")
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=2400)
    a = ap.parse_args(argv)
    try:
        path = screenshot(a.page, a.out, a.width, a.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"screenshot_examples: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

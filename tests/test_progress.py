"""Progress: plain periodic lines with throughput and ETA when there is no terminal."""

from __future__ import annotations

import io

from mmembed.progress import Progress, format_eta, progress_mode


def test_lines_mode_prints_every_n_items_with_rate_and_eta():
    out = io.StringIO()  # not a terminal
    assert progress_mode(out) in ("lines", "off")
    with Progress(100, "encode demo", "rows", every=25, stream=out, mode="lines") as p:
        for _ in range(10):
            p.update(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # 30, 60, 90 (every 25 items, checked per update of 10) and the final 100
    assert lines[0].startswith("encode demo: 30/100 rows (30%), ") and "rows/s, ETA " in lines[0]
    assert lines[-1].startswith("encode demo: 100/100 rows (100%)")


def test_off_prints_nothing_and_eta_formats():
    out = io.StringIO()
    with Progress(10, "x", stream=out, mode="off") as p:
        p.update(10)
        p.write("hidden")
    assert out.getvalue() == ""
    assert [format_eta(s) for s in (5, 185, 7620, float("inf"))] == ["5s", "3m05s", "2h07m", "?"]

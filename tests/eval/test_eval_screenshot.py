"""examples.html renders in headless Chromium (tools/screenshot_examples.py); skipped only without a browser."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mmembed.eval import run_eval

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "_tool_screenshot_examples", REPO / "tools" / "screenshot_examples.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_examples_page_screenshot(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    tool = _tool()
    if tool.find_chromium() is None:
        pytest.skip("no Chromium installed (apt-get install -y chromium)")
    model, data = eval_setup
    run_eval(model, data, tmp_path / "out", n_examples=3, cache_dir=None)
    png = tmp_path / "examples.png"
    assert tool.main([str(tmp_path / "out" / "examples.html"), str(png), "--width", "1200", "--height", "1600"]) == 0
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1200, 1600)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # something was drawn, not a blank page
    # what the browser built: the summary table (a row per dataset) and n_examples examples per dataset
    import json

    names = sorted(json.loads((tmp_path / "out" / "scores.json").read_text())["datasets"])
    dom = tool.dump_dom(tmp_path / "out" / "examples.html")
    summary = dom.split('class="summary"', 1)[1].split("</table>", 1)[0]
    assert all(f'href="#{n}"' in summary or f">{n}<" in summary for n in names), summary[:2000]
    assert dom.count('class="query"') == 3 * len(names)
    assert "&lt;image&gt;" not in dom and "cand 0" not in dom

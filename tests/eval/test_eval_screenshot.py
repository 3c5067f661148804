"""examples.html: its content read with the standard library's HTML parser (always), and its rendering in headless
Chromium (tools/screenshot_examples.py; marked ``browser``, run by ``make test-all`` where Chromium is installed)."""

from __future__ import annotations

import importlib.util
import json
from html.parser import HTMLParser
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


class _Page(HTMLParser):
    """Counts the elements of examples.html by class, and collects the summary table's text and links."""

    def __init__(self) -> None:
        super().__init__()
        self.classes: dict[str, int] = {}
        self.summary: list[str] = []
        self._in_summary = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for c in (a.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        if tag == "table" and "summary" in (a.get("class") or "").split():
            self._in_summary = 1
        elif self._in_summary and tag == "a" and a.get("href"):
            self.summary.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_summary = 0

    def handle_data(self, data: str) -> None:
        if self._in_summary:
            self.summary.append(data.strip())


def test_examples_page_lists_every_dataset_and_its_examples(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = eval_setup
    run_eval(model, data, tmp_path / "out", n_examples=3, cache_dir=None)
    html = (tmp_path / "out" / "examples.html").read_text()
    page = _Page()
    page.feed(html)
    names = sorted(json.loads((tmp_path / "out" / "scores.json").read_text())["datasets"])
    assert names and all(f"#{n}" in page.summary or n in page.summary for n in names), page.summary
    assert page.classes.get("query") == 3 * len(names)
    assert "&lt;image&gt;" not in html and "cand 0" not in html  # no internal tokens or placeholder labels


@pytest.mark.browser
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
    names = sorted(json.loads((tmp_path / "out" / "scores.json").read_text())["datasets"])
    dom = tool.dump_dom(tmp_path / "out" / "examples.html")
    summary = dom.split('class="summary"', 1)[1].split("</table>", 1)[0]
    assert all(f'href="#{n}"' in summary or f">{n}<" in summary for n in names), summary[:2000]
    assert dom.count('class="query"') == 3 * len(names)
    assert "&lt;image&gt;" not in dom and "cand 0" not in dom

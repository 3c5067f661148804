"""scores.md (chance, gain, recall@k, timing, recipe) and examples.html (summary, worst misses, no internal tokens)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from mmembed.data.formats import EvalExample
from mmembed.data.sample import Side
from mmembed.eval import run_eval
from mmembed.eval.embed import plan_dataset
from mmembed.eval.examples import select_rows
from mmembed.eval.protocol import score_plan
from mmembed.eval.report_html import examples_html
from tests.eval.helpers import known_set, t2i_set

VOID = {"img", "meta", "br", "hr", "input", "link"}


class _Page(HTMLParser):
    """Checks nesting and collects ids, links, summary rows and example cards per section."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.summary_rows = 0
        self.cards: dict[str, int] = {}
        self.section: str | None = None
        self.in_summary = False
        self.confusions = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "table" and a.get("class") == "summary":
            self.in_summary = True
        if tag == "table" and a.get("class") == "confusion":
            self.confusions += 1
        if tag == "tr" and self.in_summary and "tbody" in self.stack:
            self.summary_rows += 1
        if tag == "section":
            self.section = a["id"]
            self.cards[self.section] = 0
        if tag == "div" and a.get("class") == "q":
            self.cards[self.section or "?"] = self.cards.get(self.section or "?", 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag == "table":
            self.in_summary = False


def _check_page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    assert not page.errors and page.stack == [], (page.errors, page.stack)
    for bad in ("<image>", "&lt;image&gt;", "<|image_", "&lt;|image_", "cand 0"):
        assert bad not in text, bad
    assert set(page.links) <= page.ids
    return page


def _plan_with_margins(margins: list[float]) -> tuple:
    """Row i: query ``q i`` with candidates ``c i`` (positive) and ``d i``; scores 1 + m_i and 1."""
    pairs = [(Side(text=f"q {i}"), [Side(text=f"c {i}"), Side(text=f"d {i}")]) for i in range(len(margins))]
    rows = [EvalExample(query=q, candidates=c) for q, c in pairs]
    plan = plan_dataset("m", rows)
    emb = np.zeros((len(plan.sides), 1), dtype=np.float32)
    for u, side in enumerate(plan.sides):
        kind, i = side.text.split()
        emb[u, 0] = {"q": 1.0, "c": 1.0 + margins[int(i)], "d": 1.0}[kind]
    return plan, emb


def test_examples_are_the_worst_misses_then_the_near_ties() -> None:
    margins = [0.5, -0.25, 0.0625, -0.75, 0.25, 0.0]
    plan, emb = _plan_with_margins(margins)
    d = score_plan(plan, emb, n_examples=4, confusion=True)
    assert [e["row"] for e in d["examples"]] == [3, 1, 5, 2]
    assert d["examples"][0]["margin"] == pytest.approx(-0.75) and d["examples"][0]["positive_rank"] == 2
    assert d["misses"] == 2 and sum(c["count"] for c in d["confusion"]) == 2
    assert {(c["true"], c["predicted"]) for c in d["confusion"]} == {("c 3", "d 3"), ("c 1", "d 1")}
    # rows not scored (missing image) come last
    assert list(select_rows(np.array([np.nan, 0.5, -1.0, np.nan]), 4)) == [2, 1, 0, 3]


def test_scores_md_and_json_have_chance_gain_recall_timing_and_the_recipe(tmp_path: Path, _tiny_model) -> None:
    run = tmp_path / "run"
    _tiny_model.save(run / "final")
    (run / "config.yaml").write_text("model: {}\nloss:\n  type: infonce\n  temperature: 0.05\ntrain:\n  lr: 0.002\n")
    (run / "versions.json").write_text("{}")
    known_set(tmp_path / "data", n=6, k=4, name="N24News")
    t2i_set(tmp_path / "data", n=6, k=3, name="MSCOCO_t2i")
    run_eval(run / "final", tmp_path / "data", tmp_path / "out", n_examples=2, cache_dir=None)
    md = (tmp_path / "out" / "scores.md").read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| Meta-task |"))
    for col in ("| chance |", "| gain |", "| recall@5 |", "| recall@10 |", "| s |", "| rows/s |"):
        assert col in head, col
    row = next(ln for ln in md.splitlines() if ln.startswith("| CLS | N24News |")).split("|")
    assert row[7].strip() == "25.0"  # chance: 4 candidates (row[6] is the official score)
    assert row[8].strip() == f"{float(row[5]) - 25.0:+.1f}"  # gain = hit@1 - chance
    assert "| chance |" in md and "Timing: 2 dataset(s), 12 rows in" in md
    assert "Training recipe: `" in md and "loss.type: `infonce`" in md and "train.lr: `0.002`" in md
    assert "`hf_causal_lm backbone`" in md and "`mlp depth=2`" in md and "`last_token`" in md
    s = json.loads((tmp_path / "out" / "scores.json").read_text())
    d = s["datasets"]["N24News"]
    assert d["seconds"] >= 0 and "examples" not in d and len(d["confusion"]) <= 10
    info = s["model_info"]
    assert info["pooler"] == "last_token" and info["recipe"]["config"]["loss"]["type"] == "infonce"


def test_a_model_dir_outside_a_run_has_no_recipe(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    src, data = eval_setup
    model = Path(shutil.copytree(src, tmp_path / "model"))
    (tmp_path / "config.yaml").write_text("unrelated: true\n")  # beside the model, but not a training run
    run_eval(model, data, tmp_path / "out", datasets=["N24News"], cache_dir=None)
    md = (tmp_path / "out" / "scores.md").read_text()
    assert "Training recipe: unknown" in md and "| backbone |" in md


def test_examples_page_summary_sections_and_no_internal_tokens(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = eval_setup
    run_eval(model, data, tmp_path / "out", n_examples=4, cache_dir=None)
    text = (tmp_path / "out" / "examples.html").read_text()
    page = _check_page(text)
    assert page.summary_rows == 2
    assert {"ds-N24News", "ds-MSCOCO_t2i"} <= set(page.links) <= page.ids
    assert page.cards == {"ds-N24News": 4, "ds-MSCOCO_t2i": 4}
    assert page.confusions <= 1  # N24News is CLS: a confusion table when it has misses, never for MSCOCO_t2i
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    if scores["datasets"]["N24News"].get("misses"):
        assert page.confusions == 1 and "Most frequent confusions" in text
    assert "label 0" in text  # candidates are named by their text


def test_page_from_hand_made_results_strips_placeholders() -> None:
    ex = {
        "row": 0,
        "source": "/d/x.jsonl:line 1",
        "query": {"instruction": "Find <image>", "text": "<|image_1|> a cat", "images": []},
        "top": [
            {"index": 0, "rank": 1, "score": 0.5, "positive": False, "text": "<|image_pad|>dog", "images": []},
            {"index": 1, "rank": 7, "score": 0.1, "positive": True, "text": "cat", "images": []},
        ],
        "hit@1": 0.0,
        "margin": -0.4,
        "positive_rank": 7,
        "missing_images": [],
        "num_candidates": 10,
    }
    ds = {"x": {"n": 1, "hit@1": 0.0, "chance": 0.1, "missing_images": 0, "meta_task": "CLS", "examples": [ex]}}
    ds["x"]["confusion"], ds["x"]["misses"] = [{"true": "cat", "predicted": "<|image_pad|>dog", "count": 1}], 1
    text = examples_html(ds, title="t")
    page = _check_page(text)
    assert page.cards == {"ds-x": 1} and page.confusions == 1 and "positive ranked #7 of 10" in text
    assert "a cat" in text and "dog" in text and "image_pad" not in text

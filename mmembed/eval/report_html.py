"""``examples.html``: one self-contained page to see what a model gets wrong.

On top, a summary table (per dataset: n, hit@1, chance, missing images, a link to its section). Then per
dataset the rows the evaluator selected (:mod:`mmembed.eval.examples`): the worst misses first, then the
near-ties, each with its query and top-5 candidates (the positive outlined in green, and added when it is not
among them), scores and the positive's margin over the best negative; for classification datasets the most
frequent confusions (true label -> predicted label). Thumbnails are embedded as base64 JPEG data URIs.
Model-internal tokens never show: image placeholders are removed from texts, candidates are named by their
text or thumbnail, not by an index.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

__all__ = ["examples_html", "clean_text", "section_id"]

# image/video placeholders of the backbones (docs/mmeb.md §1.2) and of MMEB files
_TOKENS = re.compile(r"<\|(?:image|video)_\d+\|>|<\|[a-z_]*(?:image|video|vision)[a-z_]*\|>|<image>|<video>")


def clean_text(text: str | None) -> str:
    """``text`` without image placeholders (``<image>``, ``<|image_1|>``, ``<|image_pad|>``...), spaces collapsed."""
    return " ".join(_TOKENS.sub(" ", text or "").split())


def section_id(name: str) -> str:
    """The HTML id of a dataset's section (letters, digits, ``-`` and ``_``)."""
    return "ds-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _thumb(path: str, size: int = 112) -> str:
    """An ``<img>`` with the image as a base64 JPEG data URI, or a grey box when it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        data = base64.b64encode(buf.getvalue()).decode()
        return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(Path(path).name)}">'
    except Exception:  # noqa: BLE001 - a missing or broken image is shown as such, never fatal
        return f'<div class="noimg">missing<br>{html.escape(Path(path).name)}</div>'


def _side_html(side: dict[str, Any]) -> str:
    parts = [_thumb(p) for p in side.get("images", [])]
    inst = clean_text(side.get("instruction"))
    if inst:
        parts.append(f'<div class="inst">{html.escape(inst)}</div>')
    text = clean_text(side.get("text"))
    if text:
        parts.append(f'<div class="text">{html.escape(text[:300])}</div>')
    if not parts:
        parts.append('<div class="text empty">(empty)</div>')
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:20px;color:#222}
h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right;font-family:monospace}
.q{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;border:1px solid #ddd;border-radius:6px;
   padding:8px;margin:10px 0}
.query{width:210px;flex:none;background:#f6f6f6;padding:6px;border-radius:4px}
.opt{width:150px;flex:none;padding:6px;border-radius:4px;border:2px solid transparent;background:#fafafa}
.opt.pos{border-color:#2a2}.opt.extra{border-style:dashed}
img{max-width:112px;max-height:112px;display:block;margin-bottom:4px}
.noimg{width:100px;height:60px;background:#eee;color:#a00;font-size:11px;text-align:center;padding-top:10px}
.inst{font-size:11px;color:#666}.text{font-size:13px}.empty{color:#999}
.score{font-size:12px;color:#444;font-family:monospace}.src{font-size:11px;color:#888}
.badge{font-weight:bold;padding:2px 6px;border-radius:3px;color:white;font-size:12px}
.hit{background:#2a2}.miss{background:#c33}.part{background:#d90}.postag{color:#2a2;font-weight:bold}
"""


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def _badge(r: dict[str, Any]) -> tuple[str, str]:
    h = r["hit@1"]
    kind = "hit" if h == 1 else ("miss" if h == 0 else "part")
    return kind, {"hit": "HIT", "miss": "MISS"}.get(kind, f"TIE {h:.2f}")


def _candidate(c: dict[str, Any]) -> str:
    rank = f"#{c['rank']}" if c.get("rank") else "not scored"
    score = "" if c.get("score") is None else f" · {c['score']:.4f}"
    pos = ' <span class="postag">positive</span>' if c["positive"] else ""
    cls = "opt" + (" pos" if c["positive"] else "") + (" extra" if c["positive"] and (c.get("rank") or 0) > 5 else "")
    return f'<div class="{cls}">{_side_html(c)}<div class="score">{rank}{score}{pos}</div></div>'


def _example(r: dict[str, Any]) -> str:
    kind, label = _badge(r)
    info = []
    if r.get("missing_images"):
        paths = r.get("missing_paths") or []
        info.append("missing image: " + (", ".join(Path(p).name for p in paths) if paths else "yes") + ", not scored")
    if r.get("positive_rank"):
        info.append(f"positive ranked #{r['positive_rank']} of {r['num_candidates']}")
    else:
        info.append(f"{r['num_candidates']} candidates")
    if r.get("margin") is not None:
        info.append(f"margin {r['margin']:+.4f}")
    src = html.escape(Path(r["source"]).name if r.get("source") else f"row {r['row'] + 1}")
    head = (
        f'<span class="badge {kind}">{label}</span><div class="score">{html.escape("; ".join(info))}</div>'
        f'<div class="src">{src}</div>'
    )
    cands = "".join(_candidate(c) for c in r["top"])
    return f'<div class="q"><div class="query">{head}{_side_html(r["query"])}</div>{cands}</div>'


def _summary(datasets: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, d in datasets.items():
        chance, hit = d.get("chance"), d.get("hit@1")
        gain = "-" if chance is None or hit is None else f"{100 * (hit - chance):+.1f}"
        cells = [
            f'<td><a href="#{section_id(name)}">{html.escape(name)}</a></td>',
            f"<td>{html.escape(str(d.get('meta_task') or '-'))}</td>",
            *(f'<td class="num">{v}</td>' for v in (d.get("n", "-"), _pct(hit), _pct(chance), gain)),
            f'<td class="num">{d.get("missing_images", 0)}</td>',
            f'<td class="num">{len(d.get("examples") or [])}</td>',
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    heads = ["dataset", "meta-task", "n", "hit@1 %", "chance %", "gain", "missing images", "shown"]
    th = "".join(f"<th>{h}</th>" for h in heads)
    return f'<table class="summary"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _confusion(d: dict[str, Any]) -> str:
    conf = d.get("confusion")
    if not conf or d.get("meta_task") != "CLS":
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(clean_text(c['true']) or c['true'])}</td>"
        f"<td>{html.escape(clean_text(c['predicted']) or c['predicted'])}</td><td class='num'>{c['count']}</td></tr>"
        for c in conf
    )
    return (
        f"<h3>Most frequent confusions (over all {d.get('misses', '?')} misses)</h3>"
        f'<table class="confusion"><thead><tr><th>true label</th><th>predicted label</th><th>count</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def examples_html(datasets: dict[str, Any], title: str = "") -> str:
    """The page for ``{dataset: scores dict with "examples" (and "confusion")}``; a bare list is the examples."""
    ds = {n: (d if isinstance(d, dict) else {"examples": list(d)}) for n, d in datasets.items()}
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Per dataset: the worst misses first (most negative margin of the positive over the best negative), "
        "then the near-ties (smallest margin). Green outline: the positive. Scores are dot products.</p>",
        _summary(ds),
    ]
    for name, d in ds.items():
        stats = f"n={d.get('n', '-')}, hit@1 {_pct(d.get('hit@1'))}%, chance {_pct(d.get('chance'))}%"
        if d.get("missing_images"):
            stats += f", {d['missing_images']} row(s) with a missing or unreadable image (misses)"
        body.append(f'<section id="{section_id(name)}"><h2>{html.escape(name)}</h2><p>{html.escape(stats)}</p>')
        body.append(_confusion(d))
        body += [_example(r) for r in d.get("examples") or []]
        body.append('<p><a href="#top">back to the summary</a></p></section>')
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body id='top'>{''.join(body)}</body></html>\n"
    )

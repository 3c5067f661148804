"""Writing eval results: ``scores.json``, ``scores.md`` (MMEB table layout) and ``examples.html``.

``scores.md`` follows the layout of the VLM2Vec paper (arXiv 2410.05160, Table 2): per-dataset
Precision@1 grouped by meta-task, then one summary row with the CLS / VQA / RET / VG means, the
IND / OOD means and the overall mean, in percent. ``examples.html`` is one self-contained page
(thumbnails embedded as base64 JPEG data URIs) showing, per dataset, a few queries with their top-5
candidates, scores and whether the first one is the positive.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
from pathlib import Path
from typing import Any

from mmembed.eval.tasks import META_TASKS
from mmembed.io import library_versions

__all__ = ["write_scores", "scores_markdown", "examples_html"]


def _versions() -> dict[str, str]:

    return library_versions()


def write_scores(
    scores: dict[str, Any], out: str | Path, *, model: str, model_fingerprint: str, data: str, extra: dict | None = None
) -> dict[str, Path]:
    """Write ``scores.json``, ``scores.md`` and ``examples.html`` into ``out``; returns their paths.

    The per-dataset ``examples`` lists go to the HTML page only; ``scores.json`` gets every number
    with the model, its fingerprint, the data path, the date and the library versions.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    examples = {n: d.get("examples", []) for n, d in scores["datasets"].items()}
    clean = {
        **scores,
        "datasets": {n: {k: v for k, v in d.items() if k != "examples"} for n, d in scores["datasets"].items()},
    }
    doc = {
        **clean,
        "model": model,
        "model_fingerprint": model_fingerprint,
        "data": data,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "protocol": "MMEB: per-query candidate lists, tie-aware hit@1; means are unweighted over datasets",
        **(extra or {}),
    }
    paths = {"json": out / "scores.json", "md": out / "scores.md", "html": out / "examples.html"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["md"].write_text(scores_markdown(doc))
    paths["html"].write_text(examples_html(examples, title=f"{model}: {data}"))
    return paths


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def scores_markdown(scores: dict[str, Any]) -> str:
    """The MMEB table: per-dataset hit@1 grouped by meta-task, then the summary row (percent)."""
    ds = scores["datasets"]
    lines = [f"# MMEB-protocol scores: {scores.get('model', '')}", ""]
    if scores.get("model_fingerprint"):
        fp, data, date = scores["model_fingerprint"], scores.get("data", ""), scores.get("date", "")
        lines += [f"model fingerprint `{fp}`, data `{data}`, {date}", ""]
    lines += [
        "| Meta-task | Dataset | Split | n | hit@1 | MRR | NDCG@5 | missing images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = [m for m in META_TASKS] + sorted({d.get("meta_task") or "-" for d in ds.values()} - set(META_TASKS))
    for mt in order:
        for name, d in ds.items():
            if (d.get("meta_task") or "-") != mt:
                continue
            lines.append(
                f"| {mt} | {name} | {d.get('split') or '-'} | {d['n']} | {_pct(d['hit@1'])} | {_pct(d.get('mrr'))} | "
                f"{_pct(d.get('ndcg@5'))} | {d['missing_images']} |"
            )
    metas = scores.get("meta_tasks", {})
    splits = scores.get("splits", {})
    heads = [*metas, *splits, "Overall"]
    vals = [_pct(metas[m]["hit@1"]) for m in metas] + [_pct(splits[s]["hit@1"]) for s in splits]
    vals.append(f"**{_pct(scores['overall'])}**")
    lines += ["", "Summary (hit@1, %, unweighted means over datasets):", ""]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads), "| " + " | ".join(vals) + " |", ""]
    corpus = {n: d["corpus"] for n, d in ds.items() if "corpus" in d}
    if corpus:
        keys = [k for k in next(iter(corpus.values())) if k != "corpus_size"]
        lines += ["Corpus-level retrieval (each query against all candidates of its dataset, %):", ""]
        lines += ["| Dataset | corpus | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for n, c in corpus.items():
            lines.append(f"| {n} | {c['corpus_size']} | " + " | ".join(_pct(c[k]) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


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
    imgs = "".join(_thumb(p) for p in side.get("images", []))
    parts = [imgs]
    if side.get("instruction"):
        parts.append(f'<div class="inst">{html.escape(side["instruction"])}</div>')
    if side.get("text"):
        parts.append(f'<div class="text">{html.escape(side["text"][:300])}</div>')
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:20px;color:#222}
h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
.q{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;border:1px solid #ddd;border-radius:6px;
   padding:8px;margin:10px 0}
.query{width:200px;flex:none;background:#f6f6f6;padding:6px;border-radius:4px}
.cand{width:150px;flex:none;padding:6px;border-radius:4px;border:2px solid transparent;background:#fafafa}
.cand.pos{border-color:#2a2}
img{max-width:112px;max-height:112px;display:block;margin-bottom:4px}
.noimg{width:100px;height:60px;background:#eee;color:#a00;font-size:11px;text-align:center;padding-top:10px}
.inst{font-size:11px;color:#666}.text{font-size:13px}.score{font-size:12px;color:#444;font-family:monospace}
.badge{font-weight:bold;padding:2px 6px;border-radius:3px;color:white;font-size:12px}
.hit{background:#2a2}.miss{background:#c33}.part{background:#d90}
"""


def _rank(r: dict[str, Any]) -> str:
    rank = r.get("positive_rank")
    return "" if rank is None else f", positive ranked #{rank}"


def _score(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def examples_html(examples: dict[str, list[dict[str, Any]]], title: str = "") -> str:
    """One page: per dataset, each kept query with its top-5 candidates (positive outlined in green)."""
    body = [f"<h1>{html.escape(title)}</h1>", "<p>Green outline: the positive. Scores are dot products.</p>"]
    for name, rows in examples.items():
        body.append(f"<h2>{html.escape(name)}</h2>")
        for r in rows:
            h = r["hit@1"]
            badge = "hit" if h == 1 else ("miss" if h == 0 else "part")
            label = {"hit": "HIT", "miss": "MISS"}.get(badge, f"TIE {h:.2f}")
            if r.get("missing_images"):
                label += " (missing image: " + ", ".join(r["missing_images"]) + ")"
            cands = "".join(
                f'<div class="cand{" pos" if c["positive"] else ""}">{_side_html(c)}'
                f'<div class="score">#{i + 1} cand {c["index"]} score {_score(c["score"])}</div></div>'
                for i, c in enumerate(r["top"])
            )
            body.append(
                f'<div class="q"><div class="query"><span class="badge {badge}">{html.escape(label)}</span>'
                f'<div class="score">row {r["row"]}, {r["num_candidates"]} candidates{_rank(r)}</div>'
                f"{_side_html(r['query'])}</div>"
                f"{cands}</div>"
            )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )

"""Writing eval results: ``scores.json``, ``scores.md`` (MMEB table layout) and ``examples.html``.

``scores.md`` follows the layout of the VLM2Vec paper (arXiv 2410.05160, Table 2): per-dataset
Precision@1 grouped by meta-task, then one summary row with the CLS / VQA / RET / VG means, the
IND / OOD means and the overall mean, in percent. Two score definitions stand side by side
(:data:`mmembed.eval.metrics.SCORE_DEFINITIONS`, also written to ``scores.json``): ``hit@1`` is mmembed's
tie-aware headline (a constant model scores chance), ``official (MMEB)`` is VLM2Vec's (the positive wins ties;
NDCG@5 for NDCG tasks such as visdoc), the number comparable with published MMEB tables. Each dataset row also
shows its chance level (the mean of ``1 / candidates``), the gain over it (hit@1 - chance), recall@k, MRR,
NDCG@5, missing images and the time it took; warnings (random weights, missing images), the model's components
and its training recipe come first, the timing totals last. ``examples.html`` (:mod:`mmembed.eval.report_html`) is one
self-contained page with a summary table and, per dataset, the worst misses and near-ties.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from mmembed.eval.metrics import SCORE_DEFINITIONS
from mmembed.eval.recipe import model_markdown
from mmembed.eval.report_html import examples_html
from mmembed.eval.tasks import META_TASKS
from mmembed.io import library_versions

__all__ = ["write_scores", "scores_markdown", "examples_html"]

#: per-dataset entries that go to the HTML page only (they hold inputs, not numbers)
_PAGE_ONLY = ("examples",)


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
    clean = {
        **scores,
        "datasets": {n: {k: v for k, v in d.items() if k not in _PAGE_ONLY} for n, d in scores["datasets"].items()},
    }
    doc = {
        **clean,
        "model": model,
        "model_fingerprint": model_fingerprint,
        "data": data,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "protocol": "MMEB: per-query candidate lists, tie-aware hit@1; means are unweighted over datasets",
        "score_definitions": SCORE_DEFINITIONS,
        **(extra or {}),
    }
    paths = {"json": out / "scores.json", "md": out / "scores.md", "html": out / "examples.html"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["md"].write_text(scores_markdown(doc))
    paths["html"].write_text(examples_html(scores["datasets"], title=f"{model}: {data}"))
    return paths


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def _gain(x: float | None, chance: float | None) -> str:
    if x is None or chance is None or x != x:
        return "-"
    return f"{100 * (x - chance):+.1f}"


def _official(d: dict[str, Any]) -> str:
    """The official headline in percent, its metric named when it is not hit@1 (``71.2 ndcg@5``)."""
    cell = _pct(d.get("official"))
    metric = d.get("official_metric") or "official_hit@1"
    return cell if cell == "-" or metric == "official_hit@1" else f"{cell} {metric.removeprefix('official_')}"


#: the note under the tables that says which number is which
OFFICIAL_NOTE = (
    "hit@1 is tie-aware (tied candidates count as the expected value over a random order: a constant model "
    "scores chance); **official (MMEB)** is VLM2Vec's definition (the positive, listed first, wins ties, so a "
    "constant model scores 100 there; NDCG@5 for NDCG tasks such as visdoc) and is the number comparable with "
    "published MMEB tables. Both are in "
    "scores.json (`score_definitions`)."
)


def _rate(n: float, seconds: float | None) -> str:
    return "-" if not seconds else f"{n / seconds:.1f}"


def _recall_keys(ds: dict[str, dict[str, Any]]) -> list[str]:
    """``recall@k`` columns, k > 1 (recall@1 equals hit@1: one positive per query)."""
    first = next(iter(ds.values()), {})
    keys = [k for k in first if k.startswith("recall@") and k != "recall@1"]
    return sorted(keys, key=lambda k: int(k.split("@")[1]) if k.split("@")[1].isdigit() else 0)


def _dataset_table(ds: dict[str, dict[str, Any]]) -> list[str]:
    recalls = _recall_keys(ds)
    heads = ["Meta-task", "Dataset", "Split", "n", "hit@1", "official (MMEB)", "chance", "gain", *recalls, "MRR"]
    heads.append("NDCG@5")
    heads += ["missing images", "s", "rows/s"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    order = [*META_TASKS] + sorted({d.get("meta_task") or "-" for d in ds.values()} - set(META_TASKS))
    for mt in order:
        for name, d in ds.items():
            if (d.get("meta_task") or "-") != mt:
                continue
            cells = [
                mt,
                name,
                d.get("split") or "-",
                str(d["n"]),
                _pct(d["hit@1"]),
                _official(d),
                _pct(d.get("chance")),
            ]
            cells.append(_gain(d["hit@1"], d.get("chance")))
            cells += [_pct(d.get(k)) for k in recalls]
            cells += [_pct(d.get("mrr")), _pct(d.get("ndcg@5")), str(d["missing_images"])]
            secs = d.get("seconds")
            cells += ["-" if secs is None else f"{secs:.1f}", _rate(d["n"], secs)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _group_chance(ds: dict[str, dict[str, Any]], names: list[str]) -> float | None:
    vals = [ds[n]["chance"] for n in names if n in ds and "chance" in ds[n]]
    return sum(vals) / len(vals) if vals and len(vals) == len(names) else None


def _summary(scores: dict[str, Any]) -> list[str]:
    ds = scores["datasets"]
    metas, splits = scores.get("meta_tasks", {}), scores.get("splits", {})
    groups = [(m, metas[m]) for m in metas] + [(s, splits[s]) for s in splits]
    heads = ["", *[g for g, _ in groups], "Overall"]
    hit = [_pct(v["hit@1"]) for _, v in groups] + [f"**{_pct(scores['overall'])}**"]
    chances = [_group_chance(ds, v.get("datasets", [])) for _, v in groups] + [_group_chance(ds, list(ds))]
    values = [v["hit@1"] for _, v in groups] + [scores["overall"]]
    official = [_pct(v.get("official")) for _, v in groups] + [_pct(scores.get("official_overall"))]
    lines = ["Summary (hit@1, %, unweighted means over datasets; gain = hit@1 - chance):", ""]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines.append("| hit@1 | " + " | ".join(hit) + " |")
    lines.append("| official (MMEB) | " + " | ".join(official) + " |")
    lines.append("| chance | " + " | ".join(_pct(c) for c in chances) + " |")
    lines.append("| gain | " + " | ".join(_gain(v, c) for v, c in zip(values, chances)) + " |")
    return [*lines, "", OFFICIAL_NOTE, ""]


def _timing(scores: dict[str, Any]) -> list[str]:
    ds = scores["datasets"]
    total = scores.get("seconds")
    if total is None and not any("seconds" in d for d in ds.values()):
        return []
    n = sum(d["n"] for d in ds.values())
    enc = scores.get("encode", {})
    line = f"Timing: {len(ds)} dataset(s), {n} rows"
    if total:
        line += f" in {total:.1f} s ({_rate(n, total)} rows/s)"
    if enc:
        line += f"; {enc.get('encoded', 0)} inputs encoded, {enc.get('cached', 0)} from the cache"
    world = scores.get("world_size")
    if world and world > 1:
        line += f", {world} ranks"
    return [line + ".", ""]


def scores_markdown(scores: dict[str, Any]) -> str:
    """The MMEB table: per-dataset hit@1 grouped by meta-task, then the summary rows (percent)."""
    ds = scores["datasets"]
    lines = [f"# MMEB-protocol scores: {scores.get('model', '')}", ""]
    warnings = [w.removeprefix("warning: ") for w in scores.get("warnings", [])]
    if warnings:
        lines += ["> **Warnings**", ">", *[f"> - {w}" for w in warnings], ""]
    if scores.get("model_fingerprint"):
        fp, data, date = scores["model_fingerprint"], scores.get("data", ""), scores.get("date", "")
        lines += [f"model fingerprint `{fp}`, data `{data}`, {date}", ""]
    lines += model_markdown(scores.get("model_info"))
    lines += ["## Scores", "", *_dataset_table(ds), ""]
    lines += _summary(scores)
    corpus = {n: d["corpus"] for n, d in ds.items() if "corpus" in d}
    if corpus:
        first = next(iter(corpus.values()))
        keys = [k for k in first if k != "corpus_size" and not k.startswith("official")]  # tie-aware, then the official
        lines += ["Corpus-level retrieval (each query against all candidates of its dataset, %):", ""]
        heads = [*keys, "official (MMEB)"] if "official" in first else keys
        lines += ["| Dataset | corpus | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
        for n, c in corpus.items():
            cells = [_pct(c.get(k)) for k in keys] + ([_official(c)] if "official" in first else [])
            lines.append(f"| {n} | {c['corpus_size']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _timing(scores)
    return "\n".join(lines).rstrip("\n") + "\n"

"""``mmembed compare RUN_OR_SCORES...``: several evaluations side by side.

Each argument is one of:

- a ``scores.json`` written by ``mmembed eval``, or the eval output folder holding it;
- a training run folder (``RUN/``, with ``metrics.jsonl`` and ``config.yaml``): ``RUN/eval/scores.json`` when
  present (training never writes it: it is what ``mmembed eval RUN/final --out RUN/eval`` writes, a full
  evaluation of the exported model), else the last evaluation record of ``RUN/metrics.jsonl`` (the in-training
  eval on ``data.eval``, which logs ``eval/<dataset>/hit@1``, ``eval/<meta-task>`` and ``eval/overall``);
- a ``metrics.jsonl`` file itself.

Prints a markdown table (datasets as rows, runs as columns, the metric in percent, the best of each row in bold,
then the meta-task means and the overall mean). For the default metric (mmembed's tie-aware hit@1) a second table
follows with the MMEB-official score of each run (``official`` in scores.json: VLM2Vec's definition, the positive
winning ties; NDCG@5 for NDCG tasks), the number comparable with published MMEB tables; runs without it (training
logs, older scores.json) show ``-``, and the table is left out when no run has it. ``--out DIR`` also writes
``DIR/compare.md`` and a grouped bar chart ``DIR/compare.png`` (matplotlib, Agg backend). The CLI wires
``mmembed compare`` to :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.eval.tasks import META_TASKS, task_info

__all__ = [
    "Result",
    "load_result",
    "compare_markdown",
    "official_results",
    "official_markdown",
    "compare_chart",
    "add_arguments",
    "run",
]

#: the per-dataset key of the MMEB-official score in scores.json (see :mod:`mmembed.eval.protocol`)
OFFICIAL = "official"


@dataclass
class Result:
    """One column of the comparison: per-dataset values of one metric, meta-task means and the overall mean."""

    label: str
    source: str
    datasets: dict[str, float | None]
    meta_task: dict[str, str] = field(default_factory=dict)
    groups: dict[str, float] = field(default_factory=dict)
    overall: float | None = None


def _from_scores(path: Path, metric: str, label: str) -> Result:
    try:
        s = json.loads(path.read_text())
        ds = s["datasets"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a scores.json of mmembed eval ({type(e).__name__}: {e})") from None
    vals = {n: (float(d[metric]) if d.get(metric) is not None else None) for n, d in ds.items()}
    if all(v is None for v in vals.values()):
        known = sorted(k for k, v in next(iter(ds.values()), {}).items() if isinstance(v, (int, float)))
        raise ValueError(f"{path}: no metric {metric!r} in its datasets (known: {', '.join(known)})")
    meta = {n: d.get("meta_task") or "-" for n, d in ds.items()}
    groups = {m: float(v[metric]) for m, v in s.get("meta_tasks", {}).items() if v.get(metric) is not None}
    if metric == "hit@1":
        overall = s.get("overall")
    elif metric == OFFICIAL:
        overall = s.get("official_overall", s.get("means", {}).get(OFFICIAL))
    else:
        overall = s.get("means", {}).get(metric)
    return Result(label, str(path), vals, meta, groups, None if overall is None else float(overall))


def _from_metrics(path: Path, metric: str, label: str) -> Result:
    if metric != "hit@1":
        raise ValueError(f"{path}: training logs only hit@1 (eval/<dataset>/hit@1), not {metric!r}")
    last = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and ("eval/overall" in rec or "eval/mean_hit@1" in rec):
            last = rec
    if last is None:
        raise ValueError(f"{path}: no evaluation record (eval/overall) in it; was train.eval_every set?")
    vals = {k[len("eval/") : -len("/hit@1")]: float(v) for k, v in last.items() if _is_dataset_key(k)}
    groups = {k[len("eval/") :]: float(v) for k, v in last.items() if k[len("eval/") :] in META_TASKS}
    meta = {n: task_info(n)["meta_task"] or "-" for n in vals}
    overall = last.get("eval/overall", last.get("eval/mean_hit@1"))
    step = last.get("step")
    name = f"{label}@{step}" if step is not None else label
    return Result(name, f"{path} (last eval, step {step})", vals, meta, groups, overall)


def _is_dataset_key(k: str) -> bool:
    return k.startswith("eval/") and k.endswith("/hit@1") and not k.startswith("eval/select/") and k.count("/") >= 2


def load_result(arg: str | Path, metric: str = "hit@1") -> Result:
    """The :class:`Result` of one ``mmembed compare`` argument (see the module doc); ValueError when none."""
    p = Path(arg)
    if p.is_file():
        if p.name.endswith(".jsonl"):
            return _from_metrics(p, metric, p.parent.name or p.stem)
        return _from_scores(p, metric, p.parent.name or p.stem)
    if not p.is_dir():
        raise ValueError(f"{p}: no such file or directory")
    label = p.resolve().name
    if (p / "scores.json").is_file():
        return _from_scores(p / "scores.json", metric, label)
    if (p / "eval" / "scores.json").is_file():
        return _from_scores(p / "eval" / "scores.json", metric, label)
    if (p / "metrics.jsonl").is_file():
        return _from_metrics(p / "metrics.jsonl", metric, label)
    raise ValueError(f"{p}: not an eval output nor a training run (no scores.json, eval/scores.json, metrics.jsonl)")


def _unique_labels(results: list[Result], labels: Sequence[str] | None) -> None:
    if labels:
        if len(labels) != len(results):
            raise ValueError(f"--labels gives {len(labels)} names for {len(results)} runs")
        for r, name in zip(results, labels):
            r.label = name
    seen: dict[str, int] = {}
    for r in results:
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label}#{seen[r.label]}"


def _rows(results: list[Result]) -> list[tuple[str, str]]:
    """``(dataset, meta-task)`` in MMEB order: by meta-task, then first appearance."""
    seen: dict[str, str] = {}
    for r in results:
        for n in r.datasets:
            if n not in seen or seen[n] == "-":
                seen[n] = r.meta_task.get(n, "-")
    order = [*META_TASKS] + sorted(set(seen.values()) - set(META_TASKS))
    return sorted(seen.items(), key=lambda kv: order.index(kv[1]))


def _cells(values: list[float | None]) -> list[str]:
    """Percent strings with the best of the row in bold (all of the tied best; none when fewer than 2 values)."""
    present = [v for v in values if v is not None]
    best = max(present) if len(present) > 1 else None
    out = []
    for v in values:
        if v is None:
            out.append("-")
        elif best is not None and abs(v - best) < 1e-9:
            out.append(f"**{100 * v:.1f}**")
        else:
            out.append(f"{100 * v:.1f}")
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def compare_markdown(results: list[Result], metric: str = "hit@1") -> str:
    """The side-by-side table (percent; best per row in bold) with the meta-task means and the overall mean."""
    lines = [f"# Comparison: {metric} (%)", ""]
    lines += [f"- **{r.label}**: `{r.source}`" for r in results]
    return "\n".join([*lines, "", *_table(results)]) + "\n"


def official_results(args: Sequence[str | Path], results: list[Result]) -> list[Result]:
    """The MMEB-official score of each argument, labelled as ``results``; an empty column where there is none."""
    out = []
    for a, r in zip(args, results):
        try:
            o = load_result(a, OFFICIAL)
        except ValueError:  # a training log or an older scores.json: no official score
            o = Result(r.label, r.source, {})
        o.label = r.label
        out.append(o)
    return out


def official_markdown(results: list[Result]) -> str:
    """The section of the MMEB-official scores (``""`` when no run has one)."""
    if not any(v is not None for r in results for v in r.datasets.values()):
        return ""
    lines = ["", "## official (MMEB) (%)", ""]
    lines += [
        "VLM2Vec's definition (the positive, listed first, wins ties; NDCG@5 for NDCG tasks): the number "
        "comparable with published MMEB tables. The table above is mmembed's tie-aware hit@1.",
        "",
    ]
    return "\n".join([*lines, *_table(results)]) + "\n"


def _table(results: list[Result]) -> list[str]:
    heads = ["Dataset", "Meta-task", *[r.label for r in results]]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    rows = _rows(results)
    for name, mt in rows:
        lines.append(f"| {name} | {mt} | " + " | ".join(_cells([r.datasets.get(name) for r in results])) + " |")
    groups = [m for m in META_TASKS if any(m in r.groups for r in results)]
    for m in groups:
        lines.append(f"| *{m} mean* | | " + " | ".join(_cells([r.groups.get(m) for r in results])) + " |")
    lines.append("| **Overall** | | " + " | ".join(_cells([r.overall for r in results])) + " |")
    shared = [n for n, _ in rows if all(r.datasets.get(n) is not None for r in results)]
    if len(results) > 1 and len(shared) < len(rows):
        means = [_mean([r.datasets[n] for n in shared]) for r in results]
        lines.append(f"| *mean over the {len(shared)} shared* | | " + " | ".join(_cells(means)) + " |")
        note = "The runs do not cover the same datasets: compare the mean over the shared ones, not the overall means."
        lines += ["", note]
    return lines


def compare_chart(results: list[Result], out: Path, metric: str = "hit@1") -> Path:
    """A grouped bar chart (datasets and Overall on x, one bar per run) saved as ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n, _ in _rows(results)] + ["Overall"]
    width = 0.8 / max(1, len(results))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) * max(2, len(results)) + 2), 4), dpi=110)
    for i, r in enumerate(results):
        vals = [r.datasets.get(n) for n in names[:-1]] + [r.overall]
        ys = [np.nan if v is None else 100 * v for v in vals]
        ax.bar(x - 0.4 + width * (i + 0.5), ys, width, label=r.label)
    ax.set_xticks(x, names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``mmembed compare``."""
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_OR_SCORES",
        help="a scores.json, an eval output dir holding one, or a training run dir (RUN/eval/scores.json, "
        "else the last eval record of RUN/metrics.jsonl)",
    )
    parser.add_argument("--out", default=None, help="also write OUT/compare.md and OUT/compare.png")
    parser.add_argument(
        "--metric",
        default="hit@1",
        help="per-dataset metric of scores.json (default hit@1, followed by the 'official' MMEB score)",
    )
    parser.add_argument("--labels", default=None, help="comma-separated column names, one per run")


def run(args: argparse.Namespace) -> int:
    """``mmembed compare``: print the table; with ``--out`` write ``compare.md`` and ``compare.png``. Exit code."""
    try:
        results = [load_result(a, args.metric) for a in args.runs]
        labels = [s.strip() for s in args.labels.split(",")] if getattr(args, "labels", None) else None
        _unique_labels(results, labels)
    except ValueError as e:
        print(f"mmembed: error: {e}", file=sys.stderr)
        return 2
    md = compare_markdown(results, args.metric)
    if args.metric == "hit@1":  # the tie-aware headline: show the official score beside it
        md += official_markdown(official_results(args.runs, results))
    print(md, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md)
        compare_chart(results, out / "compare.png", args.metric)
        print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0


def _parse(argv: Sequence[str] | None = None) -> Any:
    p = argparse.ArgumentParser(prog="mmembed compare", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(_parse()))

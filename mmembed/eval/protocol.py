"""MMEB protocol: each query is ranked against its own candidate list, the positive at index 0;
the score is hit@1 (Precision@1) per dataset, the unweighted mean over the datasets of each
meta-task (CLS, VQA, RET, VG), over IND and OOD datasets, and over all datasets ("overall").
Sources: VLM2Vec paper (arXiv 2410.05160) §4 and ``eval.py`` of TIGER-AI-Lab/VLM2Vec; docs/mmeb.md §1.5.

Also reported per dataset: hit@k, recall@k, MRR and NDCG@k (linear gain, MMEB-V2's ``ndcg_linear``)
over the same per-query list, and, for datasets named in ``corpus``, the same metrics with each query
ranked against the dataset's whole candidate corpus (MMEB-V2 ``eval_type: global``).

Beside these tie-aware numbers every dataset carries the MMEB-official ones (VLM2Vec's definition, the
positive winning ties: :func:`mmembed.eval.metrics.official_metrics`): ``official_hit@k``, ``official_recall@k``,
``official_mrr@k``, ``official_ndcg@k`` and ``official``, the one comparable with published MMEB tables
(``official_hit@1``, or ``official_ndcg@5`` for a task whose ``metric`` is NDCG, as MMEB-V2 visdoc), named by
``official_metric``; ``official_overall`` and ``meta_tasks``/``splits`` ``[...]["official"]`` are its means.
The tie-aware ``hit@1`` stays the headline (``overall``).

Rules that make the number independent of how it is run (VLM2Vec issue #130):
- ties are scored as the expected value over random tie order (:mod:`mmembed.eval.metrics`), so a
  constant model scores exactly the chance level;
- every distinct input is encoded once, independently of batch composition; scores within
  ``TIE_TOL`` count as tied;
- a row with a missing image file is a miss (0 on every metric) and stays in the denominator
  (``missing_images`` counts them, a warning names the first); its missing image is never encoded;
- but a dataset whose every image row has a missing or unreadable image is an error
  (:mod:`mmembed.eval.checks`): a forgotten ``--image-root`` must not read as a score.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from mmembed import dist
from mmembed.data.formats import EvalExample
from mmembed.data.skips import BadSample
from mmembed.eval.checks import check_missing, check_unreadable
from mmembed.eval.embed import EmbeddingCache, encode_plan, plan_dataset, side_key
from mmembed.eval.metrics import TIE_TOL, hit_at_k, official_headline
from mmembed.eval.scoring import score_plan
from mmembed.eval.tasks import META_TASKS, task_info
from mmembed.images import ImageError
from mmembed.progress import Progress
from mmembed.types import InputError

__all__ = ["evaluate", "hit_at_1", "side_key", "score_plan", "aggregate", "select_metric", "NOT_METRICS", "RUN_INFO"]


def hit_at_1(scores: np.ndarray, positive: int = 0, tol: float = TIE_TOL) -> float:
    """Tie-aware hit@1: 1 if the positive scores highest, ``1/(1+t)`` if it ties with ``t`` others at the top, else 0.

    The same implementation and tolerance as the pipeline (:func:`mmembed.eval.metrics.hit_at_k`, scores within
    ``TIE_TOL`` tie), so this function and ``evaluate``'s ``hit@1`` never disagree.
    """
    return hit_at_k(scores, positive, 1, tol)


def aggregate(datasets: dict[str, dict[str, Any]], metric: str = "hit@1") -> dict[str, Any]:
    """Unweighted means of ``metric`` per meta-task, per split (IND/OOD) and overall (MMEB layout)."""
    meta: dict[str, list[str]] = {}
    split: dict[str, list[str]] = {}
    for name, d in datasets.items():
        if d.get("meta_task"):
            meta.setdefault(d["meta_task"], []).append(name)
        if d.get("split"):
            split.setdefault(d["split"], []).append(name)
    order = [m for m in META_TASKS if m in meta] + sorted(m for m in meta if m not in META_TASKS)

    def mean(names: list[str]) -> float:
        return float(np.mean([datasets[n][metric] for n in names]))

    vals = [d[metric] for d in datasets.values()]
    return {
        "meta_tasks": {m: {metric: mean(meta[m]), "datasets": meta[m]} for m in order},
        "splits": {s: {metric: mean(split[s]), "datasets": split[s]} for s in sorted(split)},
        "overall": float(np.mean(vals)) if vals else float("nan"),
    }


def evaluate(
    model: Any,
    sets: dict[str, Sequence[EvalExample]],
    batch_size: int = 32,
    show_progress_bar: bool = False,
    *,
    num_workers: int = 0,
    cache: EmbeddingCache | None = None,
    ks: Sequence[int] = (1, 5, 10),
    corpus: Collection[str] | str = (),
    task_meta: dict[str, dict[str, Any]] | None = None,
    n_examples: int = 0,
) -> dict[str, Any]:
    """Score ``model`` on MMEB-style eval sets (collective under a process group: call on every rank).

    Args:
        model: anything with ``encode(texts=, images=, instruction=, batch_size=, show_progress_bar=)``
            returning (N, D) embeddings (:class:`~mmembed.model.EmbeddingModel`, the open_clip wrapper).
        sets: ``{dataset: [EvalExample]}`` (from :func:`mmembed.eval.load_eval_sets`).
        batch_size: rows per forward (does not change the scores).
        num_workers: DataLoader workers decoding images before encoding (does not change the scores).
        cache: on-disk embedding cache, or None.
        ks: cut-offs for hit@k, recall@k, ndcg@k.
        corpus: dataset names (or ``"all"``) also scored against their whole candidate corpus.
        task_meta: extra ``{dataset: {"meta_task", "split"}}`` (a ``meta.json`` tasks table).
        n_examples: rows per dataset whose top-5 is kept under ``datasets[name]["examples"]`` (the worst misses and
            near-ties); for classification (meta-task CLS) also the 10 most frequent confusions (``"confusion"``).
        show_progress_bar: per-dataset encoding progress (:class:`mmembed.progress.Progress`) and a result line.

    Raises:
        ValueError: a malformed row or refused input (naming the dataset), or
            :class:`~mmembed.eval.checks.MissingImages` when every image row of a dataset lacks its image.

    Returns:
        ``{"datasets": {name: {"hit@1", "n", "missing_images", "chance", "meta_task", "split", ...}},
        "meta_tasks": {m: {"hit@1", "official", "datasets"}}, "splits": {"IND"/"OOD": {...}}, "overall": float,
        "mean_hit@1": float (= overall), "official_overall": float (mean of the datasets' ``official``), "means":
        {metric: mean over datasets}, "encode": {counts},
        "warnings": [lines printed about missing or unreadable images]}``; each
        dataset also has ``seconds`` and its ``encode`` counts (:data:`RUN_INFO`: they depend on the run).
    """
    dim = getattr(model, "embed_dim", None)
    dim = dim if isinstance(dim, int) else None
    warnings: list[str] = []
    for name, examples in sets.items():  # before any encoding: a set whose images are all missing is an error
        warning = check_missing(name, examples)
        if warning:
            warnings.append(warning)
            dist.print0(warning, file=sys.stderr)
    out: dict[str, Any] = {"datasets": {}, "encode": {"encoded": 0, "cached": 0, "missing": 0, "unique": 0}}
    for name, examples in sets.items():
        t0 = time.perf_counter()
        plan = plan_dataset(name, examples)
        progress = _progress_factory(name) if show_progress_bar else None
        try:
            emb, stats = encode_plan(
                model, plan, batch_size=batch_size, num_workers=num_workers, cache=cache, dim=dim, progress=progress
            )
        except (BadSample, ImageError, InputError) as e:  # an input the processor refuses: name the dataset
            raise ValueError(f"eval set '{name}': {e}") from None
        for k, v in stats.items():
            out["encode"][k] = out["encode"].get(k, 0) + v
        if plan.unreadable_rows is not None and plan.unreadable_rows.any():
            check_unreadable(name, plan)
            warnings.append(
                f"warning: eval set '{name}': {int(plan.unreadable_rows.sum())} row(s) with an unreadable image, "
                f"scored as misses; first: {plan.unreadable_example}"
            )
            dist.print0(warnings[-1], file=sys.stderr)
        out["encode"]["unique"] += len(plan.sides)
        want_corpus = corpus == "all" or name in corpus
        info = task_info(name, task_meta)
        confusion = bool(n_examples) and info["meta_task"] == "CLS"
        official = official_headline(_task_metric(name, info, task_meta))
        d = score_plan(
            plan, emb, ks=ks, corpus=want_corpus, n_examples=n_examples, confusion=confusion, official=official
        )
        d.update(meta_task=info["meta_task"], split=info["split"])
        d["seconds"] = round(time.perf_counter() - t0, 3)
        d["encode"] = {**stats, "unique": len(plan.sides)}
        out["datasets"][name] = d
        if show_progress_bar:
            rate = d["n"] / d["seconds"] if d["seconds"] > 0 else float("inf")
            dist.print0(
                f"{name}: hit@1 {d['hit@1']:.4f} ({d['official_metric']} {d['official']:.4f}, "
                f"chance {d['chance']:.4f}, n={d['n']}, missing images "
                f"{d['missing_images']}) in {d['seconds']:.1f}s, {rate:.1f} rows/s "
                f"({stats['encoded']} inputs encoded, {stats['cached']} cached)"
            )
    out.update(aggregate(out["datasets"]))
    off = aggregate(out["datasets"], "official")  # the same grouping over the MMEB-official headline
    for group in ("meta_tasks", "splits"):
        for g, v in off[group].items():
            out[group][g]["official"] = v["official"]
    out["official_overall"] = off["overall"]
    out["mean_hit@1"] = out["overall"]
    out["warnings"] = warnings
    metrics = [k for k in next(iter(out["datasets"].values()), {}) if k not in NOT_METRICS]
    out["means"] = {k: float(np.mean([d[k] for d in out["datasets"].values()])) for k in metrics}
    return out


#: per-dataset keys of :func:`evaluate`'s result that are not metrics averaged into ``means``
NOT_METRICS = frozenset(
    {
        "n",
        "missing_images",
        "unreadable_images",
        "chance",
        "num_candidates",
        "meta_task",
        "split",
        "corpus",
        "examples",
        "confusion",
        "misses",
        "seconds",
        "encode",
        "official_metric",
    }
)
#: per-dataset keys that depend on how the evaluation ran (time, cache), not on the model and data
RUN_INFO = ("seconds", "encode")


def _task_metric(name: str, info: dict[str, Any], task_meta: dict[str, dict[str, Any]] | None) -> str | None:
    """The task's metric name (``"ndcg@5"`` for visdoc), from its task info or its ``meta.json`` entry; None = hit@1."""
    metric = info.get("metric") or (task_meta or {}).get(name, {}).get("metric")
    return str(metric) if metric else None


def _progress_factory(name: str) -> Callable[[int], Progress]:
    """Per-dataset progress of the encoding (rank 0): a tqdm bar on a terminal, plain lines otherwise."""

    def make(total: int) -> Progress:
        return Progress(total, f"encode {name}", "rows", enabled=dist.is_main_process())

    return make


def select_metric(scores: dict[str, Any], name: str = "overall") -> float:
    """One number from :func:`evaluate`'s result, for best-checkpoint selection (higher is better).

    ``name``: ``overall`` (MMEB mean hit@1), a mean over datasets (``mrr``, ``ndcg@5``, ``hit@5``...),
    a meta-task or split (``CLS``, ``RET``, ``IND``...), or ``DATASET/METRIC`` (``N24News/hit@1``); ``official``
    is the MMEB-official overall, ``official_hit@5``... the mean of an official metric.
    """
    if name in ("overall", "hit@1", "mean_hit@1"):
        return float(scores["overall"])
    if name == "official":
        return float(scores["official_overall"])
    if name in scores.get("means", {}):
        return float(scores["means"][name])
    if name in scores.get("meta_tasks", {}):
        return float(scores["meta_tasks"][name]["hit@1"])
    if name in scores.get("splits", {}):
        return float(scores["splits"][name]["hit@1"])
    if "/" in name:
        ds, metric = name.rsplit("/", 1)
        if ds in scores["datasets"] and metric in scores["datasets"][ds]:
            return float(scores["datasets"][ds][metric])
    known = ["overall", *scores.get("means", {}), *scores.get("meta_tasks", {}), *scores.get("splits", {})]
    raise KeyError(f"unknown eval metric {name!r}; known: {', '.join(known)} or DATASET/METRIC")

"""Running an evaluation end to end (``mmembed eval``) and the in-training evaluation hook.

``run_eval`` loads a model (an mmembed model directory or ``openclip:ARCH[:PRETRAINED]``), reads the
MMEB-eval files with rows whose images are missing kept (scored as misses, with a warning) and malformed rows
fatal (an error naming the file and row: dropping a row would change the denominator), evaluates with the
embedding cache and per-dataset progress, and writes ``scores.json``, ``scores.md`` (with the model's components
and training recipe when known) and ``examples.html`` on rank 0. A dataset whose every image is missing (a
forgotten ``--image-root``) is a ValueError, which ``mmembed eval`` reports as a one-line error (exit 2).
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import mmembed
from mmembed import dist
from mmembed.data.dataset import read_eval_set
from mmembed.data.formats import EvalExample
from mmembed.data.skips import SkipCounter
from mmembed.eval.embed import EmbeddingCache, dir_fingerprint, model_fingerprint
from mmembed.eval.openclip import PREFIX, load_openclip
from mmembed.eval.protocol import evaluate, select_metric
from mmembed.eval.recipe import describe_model
from mmembed.eval.report import write_scores
from mmembed.eval.tasks import read_task_meta

__all__ = ["load_eval_model", "load_eval_sets", "run_eval", "eval_in_training", "placeholder_of"]


def placeholder_of(model: Any) -> str:
    """The image placeholder the model's texts use (``""`` for open_clip: markers are dropped)."""
    proc = getattr(model, "processor", None)
    return str(getattr(proc, "placeholder", "<image>"))


def load_eval_model(
    spec: str | os.PathLike, device: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, str]:
    """``MODEL_DIR`` or ``openclip:ARCH[:PRETRAINED]`` -> ``(model, fingerprint)``."""
    s = str(spec)
    if s.startswith(PREFIX):
        model = load_openclip(s, device=device)
        return model, model.fingerprint

    model = mmembed.load(s, device=device, trust_remote_code=trust_remote_code)
    return model, dir_fingerprint(s)


def load_eval_sets(
    data: str | os.PathLike,
    *,
    placeholder: str = "<image>",
    image_root: str | os.PathLike | None = None,
    datasets: Collection[str] | None = None,
    strict: bool = True,
) -> dict[str, list[EvalExample]]:
    """Read MMEB-eval data for evaluation: missing images kept and marked, bad rows an error.

    Args:
        data: a directory of MMEB-eval files, one file, or a manifest YAML.
        datasets: keep only these dataset names (error naming the unknown ones).
        strict: a malformed row (no candidates, mistyped field) raises a ValueError naming the file
            and row; with False it is skipped and counted (the training loop's tolerant mode).
    """

    counter = SkipCounter(strict=strict)
    sets = read_eval_set(
        data, placeholder=placeholder, image_root=image_root, counter=counter, keep_missing_images=True
    )
    if datasets:
        unknown = sorted(set(datasets) - set(sets))
        if unknown:
            raise ValueError(f"{data}: no eval set named {', '.join(unknown)} (found: {', '.join(sets)})")
        sets = {k: v for k, v in sets.items() if k in datasets}
    for name, rows in sets.items():
        if not rows:
            raise ValueError(f"{data}: eval set '{name}' has no rows")
    return sets


def run_eval(
    model_spec: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 32,
    datasets: Sequence[str] | None = None,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = "auto",
    corpus: Collection[str] | str = (),
    n_examples: int = 3,
    image_root: str | os.PathLike | None = None,
    device: str | None = None,
    model: Any = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate and write the reports (rank 0); returns the scores on every rank.

    Args:
        model_spec: a model directory or ``openclip:ARCH[:PRETRAINED]`` (or a label when ``model`` is given).
        cache_dir: embedding cache root; ``"auto"`` = ``OUT/cache``, None = no cache.
        model: an already built model (then ``model_spec`` only names it in the report).
        trust_remote_code: passed to :func:`mmembed.load` (a model directory never turns it on itself).
    """
    started = dist.init_from_env()
    try:
        if device is None and dist.get_world_size() > 1:
            import torch

            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else None
        if model is None:
            model, fp = load_eval_model(model_spec, device=device, trust_remote_code=trust_remote_code)
        else:
            fp = model_fingerprint(model)
        sets = load_eval_sets(data, placeholder=placeholder_of(model), image_root=image_root, datasets=datasets)
        out = Path(out)
        cache = None
        if cache_dir is not None:
            cache = EmbeddingCache(out / "cache" if cache_dir == "auto" else Path(cache_dir), fp)
        t0 = time.perf_counter()
        scores = evaluate(
            model,
            sets,
            batch_size=batch_size,
            num_workers=num_workers,
            cache=cache,
            corpus=corpus,
            task_meta=read_task_meta(data),
            n_examples=n_examples,
            show_progress_bar=True,
        )
        scores["seconds"] = round(time.perf_counter() - t0, 3)
        scores["world_size"] = dist.get_world_size()
        scores["warnings"] = [*getattr(model, "warnings", []), *scores.get("warnings", [])]
        if dist.is_main_process():
            extra = {"model_info": describe_model(str(model_spec))}
            write_scores(scores, out, model=str(model_spec), model_fingerprint=fp, data=str(data), extra=extra)
        dist.barrier()
        return scores
    finally:
        if started:
            dist.shutdown()


def eval_in_training(
    model: Any,
    sets: dict[str, Sequence[EvalExample]],
    *,
    metric: str = "overall",
    batch_size: int = 64,
    num_workers: int = 0,
    task_meta: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The eval the training loop runs every ``train.eval_every`` steps (call it on every rank).

    Puts the model in eval mode for the call and restores its mode. No cache (the weights change).
    ``task_meta``: meta-tasks of non-MMEB sets, e.g. ``read_task_meta(cfg.data.eval)`` for the demo set.

    Returns:
        :func:`evaluate`'s scores plus ``"selection": {"metric": metric, "value": float}`` (higher is
        better) and ``"flat": {"eval/<dataset>/hit@1": ..., "eval/overall": ..., "eval/<meta-task>": ...}``
        ready to merge into the logged record.
    """
    was = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        scores = evaluate(model, sets, batch_size=batch_size, num_workers=num_workers, task_meta=task_meta)
    finally:
        if hasattr(model, "train"):
            model.train(was)
    scores["selection"] = {"metric": metric, "value": select_metric(scores, metric)}
    flat = {f"eval/{k}/hit@1": v["hit@1"] for k, v in scores["datasets"].items()}
    flat.update({f"eval/{m}": v["hit@1"] for m, v in scores["meta_tasks"].items()})
    flat["eval/overall"] = scores["overall"]
    flat["eval/mean_hit@1"] = scores["overall"]
    if "official_overall" in scores:
        flat["eval/official_overall"] = scores["official_overall"]
    flat[f"eval/select/{metric}"] = scores["selection"]["value"]
    scores["flat"] = flat
    return scores

"""The training loop, top to bottom (docs/architecture.md §7; nanochat's one-readable-file idea).

build model, loss, data -> ``deepspeed.initialize`` -> resume -> for each step: fetch the batch,
forward (or GradCache), one optimizer step, checkpoint, evaluate, log -> export ``final/``.

A new run (``train.resume=none``) refuses an output folder holding an earlier run unless
``train.overwrite=true``; ``train.resume=auto`` continues it. ``train.save_total_limit`` checkpoints are kept, and
never the one the run resumed from. ``loss.png`` is rewritten at every evaluation and at the end.

The checkpoint is written before the evaluation and a failing evaluation is logged (``eval/error``)
and survives: a broken held-out image must not cost the run. A skipped step (non-finite loss) is
recorded in ``metrics.jsonl`` too (``skipped_step``).

The same function runs on one CPU process (``mmembed train``), under ``deepspeed -m mmembed.train``
on many GPUs and nodes, and under ``torchrun``. Every rank computes the same global loss over the
gathered embeddings, multiplied by the world size because the engine averages gradients
(docs/deepspeed.md §2, "GradCache under DeepSpeed"); with GradCache each chunk's backward sets the
gradient-accumulation boundary so the reduction runs once per step on ZeRO 0-3.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmembed import dist
from mmembed.build import build_from_cfg, instantiate
from mmembed.config import ConfigError, RecipeCfg, to_dict
from mmembed.data import SkipCounter, build_train_loader
from mmembed.eval import eval_in_training, load_eval_sets, read_task_meta
from mmembed.io import library_versions
from mmembed.registry import LOSSES
from mmembed.train import checkpoint as ckpt
from mmembed.train import memory
from mmembed.train.deepspeed_utils import (
    build_deepspeed_config,
    engine_backward,
    gradcache_engine_hooks,
    init_distributed,
    zero3_step,
)
from mmembed.train.export import export_engine
from mmembed.train.gradcache import gradcache_step
from mmembed.train.metrics import MetricsLogger, plot_loss
from mmembed.train.setup import ContrastiveTask, make_optimizer, make_scheduler, prepare_model

__all__ = ["train", "TrainResult", "NonFiniteLoss"]


class NonFiniteLoss(RuntimeError):
    """The step's loss was NaN or inf; the step is skipped (raised before any backward)."""


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    skipped_samples: int = 0


def train(cfg: RecipeCfg) -> TrainResult:
    """Train ``cfg`` (a validated recipe) and export ``<output_dir>/final``.

    One run per ``train.output_dir``: with ``train.resume=none`` a folder that already holds a run (checkpoints,
    a non-empty ``metrics.jsonl``, ``final/`` or ``best/``) is refused with a :class:`ConfigError` before anything
    is built, unless ``train.overwrite=true``, which removes that run's files first (:data:`RUN_FILES`).

    Raises:
        ConfigError: the folder holds an earlier run, or impossible settings (DeepSpeed JSON, stages).
    """
    t = cfg.train
    out = Path(t.output_dir)
    # every rank, before DeepSpeed is imported (its import logs) or the process group exists: no rank can have
    # written anything yet, so all of them see the same folder
    earlier = _check_output_dir(cfg, out)
    ds_config = _deepspeed_config(cfg)  # settings errors surface before anything is built
    import deepspeed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if earlier and t.overwrite and _starts_over(t.resume):
        if rank == 0:
            removed = _remove_earlier_run(out)
            print(f"train.overwrite=true: removed the earlier run in {out} ({', '.join(removed)})", file=sys.stderr)
        dist.barrier()  # no rank writes into the folder before the old run is gone
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_run_info(cfg, out)
        for stale in ckpt.clean_stale_temporaries(out):  # left by a killed export or save
            print(f"removed {stale} (left behind by an interrupted run)", file=sys.stderr)

    # 1. model, loss, optimizer, schedule, engine
    torch.manual_seed(t.seed)
    model = build_from_cfg(cfg.model)
    prepare_model(model, t)
    loss_fn = instantiate(LOSSES, cfg.loss)
    task = ContrastiveTask(model, loss_fn)
    optimizer = make_optimizer(task, t)
    scheduler = make_scheduler(optimizer, t)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    # 2. resume: engine state, step and data position
    start_step, skips = 0, SkipCounter(strict=cfg.data.strict)
    resume_from = ckpt.find_checkpoint(t.resume, out / "checkpoints", verify=True)  # skips corrupt ones
    state: dict[str, Any] = {}
    if resume_from is not None:
        state, skip_state = ckpt.load_checkpoint(engine, resume_from)
        start_step = int(state["step"])
        skips = SkipCounter.from_dict(skip_state) if skip_state else skips
    loader = build_train_loader(
        cfg.data,
        model.processor,
        global_batch_size=t.batch_size * world,
        max_steps=t.max_steps,
        seed=t.seed,
        rank=rank,
        world_size=world,
    )
    if state.get("data"):
        loader.load_state_dict(state["data"])
    loader.skips = skips
    eval_sets, task_meta = None, None
    best = max(float(state.get("best_metric", float("-inf"))), _best_on_disk(out) if resume_from else float("-inf"))
    if cfg.data.eval and t.eval_every:
        eval_sets = load_eval_sets(
            cfg.data.eval, placeholder=model.processor.placeholder, image_root=cfg.data.image_root, strict=False
        )
        task_meta = read_task_meta(cfg.data.eval)
    if t.zero_stage == 3:  # ranks must run the same modules in every forward, eval included
        model.uniform_modules = True
    logger = MetricsLogger(out, start_step, t.max_steps, enabled=rank == 0, log_every=t.log_every)
    if resume_from is not None:
        logger.message(f"resumed from {resume_from} at step {start_step}")
    if earlier and t.overwrite and not _starts_over(t.resume):
        logger.message(f"train.overwrite=true is ignored: train.resume={t.resume} continues the run in {out}")
    save = functools.partial(_save, engine, out, loader=loader, cfg=cfg, protect=resume_from)
    export = functools.partial(export_engine, task, cfg, report=logger.message)

    # 3. the loop
    losses: list[float] = []
    bad_in_a_row, steps_done, last_eval = 0, start_step, None
    tick = time.perf_counter()
    for batch in loader:
        step = int(batch["step"])
        steps_done = step + 1
        torch.manual_seed(_step_seed(t.seed, step, rank))  # dropout: a function of (seed, step, rank) only
        memory.reset_peak()
        mem_start = memory.current_mb()
        try:
            loss, stats = _forward_backward(engine, task, batch, t.gradcache_chunk_size)
        except NonFiniteLoss as e:
            bad_in_a_row += 1
            logger.message(f"step {step}: {e}; step skipped ({bad_in_a_row} in a row)")
            logger.log({"step": step + 1, "skipped_step": True, "reason": str(e)})
            if bad_in_a_row >= t.max_bad_steps:
                raise RuntimeError(
                    f"{bad_in_a_row} non-finite losses in a row (train.max_bad_steps={t.max_bad_steps}); "
                    f"stopping. The last good checkpoint is intact under {out / 'checkpoints'}"
                ) from None
            continue
        bad_in_a_row = 0
        lr = optimizer.param_groups[0]["lr"]
        engine.step()
        done = step + 1
        now = time.perf_counter()
        total_skips = _global_skips(loader.skips)
        record = {
            "step": done,
            "loss": float(loss),
            "lr": lr,
            "samples_per_s": t.batch_size * world / max(now - tick, 1e-9),
            "skipped": total_skips,
            "mem_start_mb": round(mem_start, 1),
            "mem_peak_mb": round(memory.peak_mb(), 1),
            **{
                f"train/{k}": float(v)
                for k, v in stats.items()
                if k in ("accuracy", "scale", "micl_loss", "same_targets")
            },
        }
        tick = now
        losses.append(float(loss))
        logger.show(record)  # the progress line now; the record, with this step's eval scores, is logged below
        # the checkpoint comes first: whatever the evaluation does, this step's state is on disk
        if t.save_every and (done % t.save_every == 0 or done == t.max_steps):
            save(done, best=best)
            tick = time.perf_counter()
        evaluated = bool(t.eval_every and eval_sets and (done % t.eval_every == 0 or done == t.max_steps))
        if evaluated:
            scores, error = _safe_eval(model, eval_sets, t.eval_metric, task_meta)
            if error is not None:
                record["eval/error"] = error
                logger.message(f"step {done}: evaluation failed, training continues: {error}")
            else:
                last_eval = scores
                record.update(scores["flat"])
                # the chance level beside each hit@1, so loss.png (and any reader) can draw it from the log alone
                record.update({f"eval/{k}/chance": v["chance"] for k, v in scores["datasets"].items() if "chance" in v})
                logger.message(_eval_line(done, scores))
                if scores["selection"]["value"] > best:  # keep the best model by train.eval_metric
                    best = scores["selection"]["value"]
                    export(out / "best")
                    if rank == 0:
                        (out / "best" / "selection.json").write_text(json.dumps({"step": done, **scores["selection"]}))
        logger.log(record, show=False)
        if evaluated:
            if rank == 0:  # at every evaluation, so a run that dies later still has its curve
                _plot(out, logger)
            tick = time.perf_counter()

    # 4. final checkpoint and export
    if t.save_every and steps_done and not (out / "checkpoints" / f"step_{steps_done}").exists():
        save(steps_done, best=best)
    final = export(out / "final") if t.export else None
    if rank == 0:
        _plot(out, logger)
        if t.save_every and resume_from is not None:
            # the run finished with newer complete checkpoints: the one it resumed from is no longer kept aside
            ckpt.rotate_checkpoints(out / "checkpoints", t.save_total_limit)
    logger.close()
    if rank == 0:
        print(loader.skips.summary())
    dist.barrier()
    return TrainResult(out, final, steps_done, losses, last_eval, _global_skips(loader.skips))


# ----------------------------------------------------------------------------------------------
# one step


def _forward_backward(engine: Any, task: ContrastiveTask, batch: dict[str, Any], chunk: int) -> tuple[float, dict]:
    """Forward and backward of one step (plain or GradCache); returns the logged loss and stats.

    Under ZeRO-3 the step runs inside ``zero3_step``: parameters gathered once and one gradient reduction, instead
    of once per submodule call and once per GradCache chunk (a no-op on stages 0-2).
    """
    loss_fn = functools.partial(_checked_loss, task, batch.get("negative_mask"), batch.get("target_keys"))
    with zero3_step(engine):
        if chunk:
            result = gradcache_step(
                engine,
                batch["query"],
                batch["target"],
                loss_fn,
                chunk,
                split_fn=task.model.processor.split,  # the processor knows its batch layout
                loss_params=[p for p in task.loss.parameters() if p.requires_grad],
                **gradcache_engine_hooks(engine),
            )
            return float(result.loss), result.stats
        q = engine(batch["query"])  # (Bq, D)
        t = engine(batch["target"])  # (Bq * (1 + k), D)
        loss, stats = loss_fn(q, t)
        engine_backward(engine, loss, is_last=True)
    return float(stats["loss"]), stats


def _checked_loss(
    task: ContrastiveTask, negative_mask: Any, target_keys: Any, q: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    loss, stats = task.compute_loss(q, t, negative_mask, target_keys)
    if not torch.isfinite(loss):  # every rank sees the same global loss, so all skip together
        raise NonFiniteLoss(f"loss is {float(loss)}")
    return loss, stats


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


# ----------------------------------------------------------------------------------------------
# helpers


def _deepspeed_config(cfg: RecipeCfg) -> dict[str, Any]:
    t = cfg.train
    if t.deepspeed:
        path = Path(t.deepspeed)
        if not path.is_file():
            raise ConfigError("train.deepspeed", f"DeepSpeed config not found: {path}", cfg.source)
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError("train.deepspeed", f"{path}: invalid JSON ({e})", cfg.source) from None
        stage = extra.get("zero_optimization", {}).get("stage", t.zero_stage)
        if stage != t.zero_stage:
            raise ConfigError(
                "train.zero_stage", f"is {t.zero_stage} but {path} sets zero_optimization.stage={stage}", cfg.source
            )
    else:
        extra = {}
    base = build_deepspeed_config(
        micro_batch_size=t.batch_size,
        zero_stage=t.zero_stage,
        precision=t.precision,
        gradient_clipping=t.grad_clip,
    )
    # the recipe's own keys win over a shared JSON's batch/precision/stage settings
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "bf16"):
        extra.pop(key, None)
    zero = {**extra.pop("zero_optimization", {}), **base["zero_optimization"]}
    return {**base, **extra, "zero_optimization": zero}


def _safe_eval(model: Any, eval_sets: Any, metric: str, task_meta: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Run the in-training evaluation; return (scores, None) or (None, a one-line error) without raising.

    Every rank gets the same outcome (a failure anywhere counts everywhere), since what follows a good
    evaluation, the best-model export, is collective. A failure inside a collective op of the forward
    (ZeRO-3) cannot be caught this way and still stops the run.
    """

    scores, error = None, None
    try:
        scores = eval_in_training(model, eval_sets, metric=metric, batch_size=64, task_meta=task_meta)
    except Exception as e:  # any evaluation problem: the training itself is fine and goes on
        lines = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    failed = int(dist.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0])).item())
    if failed and error is None:
        error = f"evaluation failed on {failed} other rank(s)"
    return (None, error) if error is not None else (scores, None)


def _best_on_disk(out: Path) -> float:
    """The score of ``best/`` (its ``selection.json``): the checkpoint is written before the evaluation, so a
    resumed run must not take a worse model for a better one because its checkpoint predates that score."""
    try:
        return float(json.loads((out / "best" / "selection.json").read_text())["value"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("-inf")


def _global_skips(skips: SkipCounter) -> int:
    n = torch.tensor([float(skips.num_skipped)])
    return int(dist.all_reduce_sum(n).item())


def _save(engine: Any, out: Path, step: int, *, loader: Any, cfg: RecipeCfg, best: float, protect: Path | None) -> None:
    """Checkpoint ``step``; rotation keeps ``train.save_total_limit`` of them and never ``protect`` (the checkpoint
    the run resumed from: the only state this run has proven loadable)."""
    state = {
        "step": step,
        "data": loader.state_dict(),
        "seed": cfg.train.seed,
        "world_size": dist.get_world_size(),
        "best_metric": best,
    }
    ckpt.save_checkpoint(
        engine,
        out / "checkpoints",
        step,
        state,
        loader.skips.to_dict(),
        keep=cfg.train.save_total_limit,
        protect=protect,
    )


def _plot(out: Path, logger: MetricsLogger) -> None:
    """Rewrite ``loss.png`` (rank 0); a plotting problem is reported, never fatal."""
    if not (out / "metrics.jsonl").exists():
        return
    try:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    except Exception as e:  # matplotlib or a damaged log: the run itself is fine
        logger.message(f"loss.png not written: {type(e).__name__}: {e}")


# what a run leaves in its output_dir; train.overwrite=true removes exactly these (other files are the user's)
RUN_FILES = ("checkpoints", "metrics.jsonl", "best", "final", "loss.png", "tensorboard", "config.yaml", "versions.json")


def _starts_over(resume: str) -> bool:
    return resume in ("none", "")


def _earlier_run(out: Path) -> list[str]:
    """What in ``out`` shows that a run already trained there: a ``checkpoints/step_*``, a non-empty
    ``metrics.jsonl``, ``final/`` or ``best/`` (``config.yaml`` alone is what a run that failed to start leaves)."""
    found = []
    if any(p.is_dir() for p in (out / "checkpoints").glob("step_*")):
        found.append("checkpoints/")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    found += [f"{name}/" for name in ("final", "best") if (out / name).exists()]
    return found


def _check_output_dir(cfg: RecipeCfg, out: Path) -> list[str]:
    """Refuse to start a new run (``train.resume=none``) over an earlier one unless ``train.overwrite=true``:
    it would truncate that run's ``metrics.jsonl`` and leave its checkpoints beside the new ones, where a later
    ``resume=auto`` would pick them. Returns what was found (for the removal and the notes)."""
    found = _earlier_run(out) if out.is_dir() else []
    if found and _starts_over(cfg.train.resume) and not cfg.train.overwrite:
        raise ConfigError(
            "train.output_dir",
            f"{out} already holds an earlier run ({', '.join(found)}); continue it with train.resume=auto "
            f"or start over with train.overwrite=true (removes that run's files)",
            cfg.source,
        )
    return found


def _remove_earlier_run(out: Path) -> list[str]:
    """Delete the earlier run's files (rank 0, for ``train.overwrite=true``); returns the names removed."""
    removed = []
    # .final.old-*/.best.old-* hold an earlier model after a kill mid-export: also the old run's, so also gone
    for path in [*(out / n for n in RUN_FILES), *out.glob(".final.old-*"), *out.glob(".best.old-*")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(f"{path.name}/")
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(path.name)
    return removed


def _eval_line(step: int, scores: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {v['hit@1']:.3f}" for k, v in scores["datasets"].items())
    sel = scores["selection"]
    return f"step {step}: held-out hit@1 mean {scores['mean_hit@1']:.3f} ({parts}); {sel['metric']} {sel['value']:.3f}"


def _write_run_info(cfg: RecipeCfg, out: Path) -> None:
    from omegaconf import OmegaConf

    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    (out / "versions.json").write_text(json.dumps(library_versions(), indent=2) + "\n")

"""ZeRO-0 vs ZeRO-3, plain vs GradCache, on 2 CPU ranks: throughput ratios and where a step's time goes (#16).

    python tools/bench_train.py --zero-breakdown                    # tiny recipe, batch 16 per rank, chunk 4
    python tools/bench_train.py --zero-breakdown --batch 32 --chunk 8 --steps 10 --set train.precision=bf16

The launcher side writes the demo data (into a temp dir unless ``--data``), starts ``torchrun --nproc_per_node 2``
on this file with ``--worker`` (gloo, ``OMP_NUM_THREADS=1``, as ``tests/multirank`` launches its ranks) and prints
rank 0's results. Each rank builds the model, loss, optimizer, DeepSpeed config and engine the way
``mmembed.train.loop.train`` does, then runs the loop's own step (``loop._forward_backward`` + ``engine.step()``)
on the loop's data for four settings from the same initial weights: ZeRO-0 plain, ZeRO-0 + GradCache, ZeRO-3 plain,
ZeRO-3 + GradCache (plain = the whole batch in one graph). Steps/s count the data, the step and nothing else
(``--warmup`` steps first, untimed: ZeRO-3 records its parameter trace there).

Phases are wall-clock timers wrapped around the engine, the loss and DeepSpeed internals (CPU ops are synchronous,
so no synchronization is needed): ``forward, no grad`` is GradCache's first pass; ``forward, with grad`` the plain
forward or GradCache's re-forward; indented rows are parts of the row above them (ZeRO-3 parameter all-gathers and
releases in the module hooks, the trace bookkeeping at the start of every forward, the gradient reduction inside
``engine.backward``); ``collectives`` counts and times every ``torch.distributed`` call of a step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# name, ZeRO stage, GradCache, ZeRO-3 per-module path (no ``zero3_step``: the training loop before #16's fix)
SETTINGS = [("ZeRO-0 plain", 0, False, False), ("ZeRO-0 + GradCache", 0, True, False)]
SETTINGS += [("ZeRO-3 plain", 3, False, False), ("ZeRO-3 + GradCache", 3, True, False)]
PER_MODULE = [("ZeRO-3 plain, per-module", 3, False, True), ("ZeRO-3 + GC, per-module", 3, True, True)]
TOP = ("data", "forward, no grad", "forward, with grad", "loss (+ embedding gather)", "backward", "coalesced reduction")
TOP += ("optimizer step", "gathered")
ROWS = (
    ("data", "data (next batch)"),
    ("forward, no grad", "forward, no grad (GradCache pass 1)"),
    ("forward, with grad", "forward, with grad (plain / re-forward)"),
    ("fetch/fwd", "  ZeRO-3 param all-gather + wait"),
    ("release/fwd", "  ZeRO-3 param release (re-partition)"),
    ("trace", "  ZeRO-3 trace bookkeeping (reset_step)"),
    ("loss (+ embedding gather)", "loss (+ embedding gather)"),
    ("embedding gather", "  embedding all-gather"),
    ("backward", "backward"),
    ("fetch/bwd", "  ZeRO-3 param all-gather + wait"),
    ("release/bwd", "  ZeRO-3 param release (re-partition)"),
    ("grad reduction", "  gradient reduction (all-reduce / reduce-scatter)"),
    ("coalesced reduction", "gradient reduction, once per step (coalesced)"),
    ("optimizer step", "optimizer step (engine.step)"),
    ("gathered", "ZeRO-3 gather all / partition + hooks off / on"),
    ("other", "other (split, RNG, cache, boundary flags)"),
    ("collectives", "collectives: time (all of the above)"),
)
COLLECTIVES = ("all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "all_reduce", "broadcast", "barrier")


class Phases:
    """Accumulated wall time and call count per phase name; ``patch`` times a function under a (computed) name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[tuple[Any, str, bool, Any]] = []
        self._open: dict[str, int] = defaultdict(int)  # calls of a phase in progress: only the outermost is timed

    def wrap(self, fn: Callable[..., Any], name: str | Callable[..., str]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            key = name(*args, **kwargs) if callable(name) else name
            if self._open[key]:
                return fn(*args, **kwargs)
            self._open[key] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1
                self._open[key] -= 1

        return timed

    def patch(self, owner: Any, attr: str, name: str | Callable[..., str]) -> None:
        """Replace ``owner.attr`` (a class, module or instance attribute) with a timed version until ``restore``."""
        if not hasattr(owner, attr):  # another DeepSpeed version
            return
        own = attr in vars(owner)
        self._undo.append((owner, attr, own, vars(owner).get(attr)))
        setattr(owner, attr, self.wrap(getattr(owner, attr), name))

    def restore(self) -> None:
        for owner, attr, own, original in reversed(self._undo):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._undo.clear()

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


_ACTIVE: list[Phases] = []  # the setting being timed: the collectives report into it


def _count_collectives() -> None:
    """Time every ``torch.distributed`` collective into the active ``Phases``. Installed before the process group
    starts, because DeepSpeed's backend keeps its own references to the all-gather and reduce-scatter functions."""

    def wrap(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if not _ACTIVE:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _ACTIVE[-1].seconds["collectives"] += time.perf_counter() - start
                _ACTIVE[-1].calls["collectives"] += 1
                _ACTIVE[-1].calls[f"collective {name}"] += 1

        return counted

    for name in COLLECTIVES:
        setattr(torch.distributed, name, wrap(getattr(torch.distributed, name), name))


def _fwd_name(*_: Any, **__: Any) -> str:
    return "forward, with grad" if torch.is_grad_enabled() else "forward, no grad"


def _instrument(phases: Phases, engine: Any, task: Any) -> None:
    """Timers on the engine, the loss and the DeepSpeed internals the four settings go through."""
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    import mmembed.losses

    phases.patch(engine, "forward", _fwd_name)
    phases.patch(engine, "backward", "backward")
    phases.patch(engine, "step", "optimizer step")
    phases.patch(task, "compute_loss", "loss (+ embedding gather)")
    phases.patch(mmembed.losses, "all_gather_with_local_grad", "embedding gather")
    phases.patch(Coordinator, "fetch_sub_module", lambda _s, _m, forward: f"fetch/{'fwd' if forward else 'bwd'}")
    phases.patch(
        Coordinator, "release_sub_module", lambda _s, _m, forward=False: f"release/{'fwd' if forward else 'bwd'}"
    )
    phases.patch(Coordinator, "reset_step", "trace")
    phases.patch(DeepSpeedEngine, "allreduce_gradients", "grad reduction")
    phases.patch(DeepSpeedEngine, "_flush_coalesced_reduction_zero3", "coalesced reduction")
    phases.patch(deepspeed.zero.GatheredParameters, "__enter__", "gathered")
    phases.patch(deepspeed.zero.GatheredParameters, "__exit__", "gathered")
    phases.patch(DeepSpeedZeRoOffload, "_register_deepspeed_module", "gathered")


def _build(cfg: Any) -> tuple[Any, Any, Any]:
    """Model, loss, optimizer, schedule, engine and loader, as ``mmembed.train.loop.train`` builds them."""
    import deepspeed

    from mmembed import dist
    from mmembed.build import build_from_cfg, instantiate
    from mmembed.data import build_train_loader
    from mmembed.registry import LOSSES
    from mmembed.train.loop import _deepspeed_config
    from mmembed.train.setup import ContrastiveTask, make_optimizer, make_scheduler, prepare_model

    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_from_cfg(cfg.model)
    prepare_model(model, t)
    task = ContrastiveTask(model, instantiate(LOSSES, cfg.loss))
    optimizer = make_optimizer(task, t)
    engine, *_ = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, t), config=_deepspeed_config(cfg)
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = build_train_loader(
        cfg.data, model.processor, global_batch_size=t.batch_size * world, max_steps=t.max_steps, seed=t.seed,
        rank=rank, world_size=world,
    )  # fmt: skip
    if t.zero_stage == 3:
        model.uniform_modules = True
    return engine, task, loader


def _run_setting(args: argparse.Namespace, stage: int, gradcache: bool, per_module: bool = False) -> dict[str, Any]:
    from mmembed import dist
    from mmembed.config import load_recipe
    from mmembed.train import loop
    from mmembed.train.deepspeed_utils import Zero3StepMode, zero3_step

    overrides = [
        f"data.train={Path(args.data) / 'train.yaml'}",
        "data.eval=null",
        "data.num_negatives=1",
        "data.num_workers=0",
        f"train.batch_size={args.batch}",
        f"train.gradcache_chunk_size={args.chunk if gradcache else 0}",
        f"train.zero_stage={stage}",
        f"train.max_steps={args.warmup + args.steps}",
        "train.optimizer=sgd",
        "train.lr=1e-3",
        "train.grad_clip=0.0",
        "train.save_every=0",
        "train.eval_every=0",
        *args.set,
        *(args.set3 if stage == 3 else []),
    ]
    cfg = load_recipe(ROOT / args.recipe, overrides)
    engine, task, loader = _build(cfg)
    phases = Phases()
    _instrument(phases, engine, task)
    loop.zero3_step = (lambda _engine: contextlib.nullcontext(Zero3StepMode())) if per_module else zero3_step
    _ACTIVE.append(phases)
    step_times, losses, it = [], [], iter(loader)
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                dist.barrier()
                phases.reset()
            start = time.perf_counter()
            batch = next(it)
            phases.seconds["data"] += time.perf_counter() - start
            torch.manual_seed(loop._step_seed(cfg.train.seed, int(batch["step"]), dist.get_rank()))
            loss, _ = loop._forward_backward(engine, task, batch, cfg.train.gradcache_chunk_size)
            engine.step()
            losses.append(loss)
            if step >= args.warmup:
                step_times.append(time.perf_counter() - start)
        dist.barrier()
    finally:
        phases.restore()
        _ACTIVE.clear()
        loop.zero3_step = zero3_step
    n = len(step_times)
    ms = {k: 1000 * v / n for k, v in phases.seconds.items()}
    ms["other"] = 1000 * sum(step_times) / n - sum(ms.get(k, 0.0) for k in TOP)
    engine.destroy()
    return {
        "steps_per_s": n / sum(step_times),
        "samples_per_s": n * args.batch * dist.get_world_size() / sum(step_times),
        "median_step_ms": 1000 * statistics.median(step_times),
        "ms_per_step": ms,
        "collective_calls_per_step": phases.calls.get("collectives", 0) / n,
        "collective_calls_by_kind": {
            k.split()[1]: v / n for k, v in phases.calls.items() if k.startswith("collective ")
        },
        "phase_calls_per_step": {k: v / n for k, v in phases.calls.items() if not k.startswith("collective")},
        "first_loss": losses[0],
        "losses": losses,
    }


def worker(args: argparse.Namespace) -> None:
    from mmembed import dist
    from mmembed.train.deepspeed_utils import init_distributed

    _count_collectives()
    init_distributed()
    settings = SETTINGS + (PER_MODULE if args.per_module else [])
    results = {name: _run_setting(args, stage, gc, per) for name, stage, gc, per in settings}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    torch.distributed.destroy_process_group()


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the throughput ratios and the per-phase table (ms per step, rank 0)."""
    names = list(results)
    base = results[names[0]]
    extra = "".join(f", {o}" for o in args.set) + "".join(f", ZeRO-3: {o}" for o in args.set3)
    print(
        f"{args.recipe}, 2 CPU ranks (gloo), batch {args.batch} queries per rank + 1 hard negative, GradCache chunk "
        f"{args.chunk}, {args.steps} timed steps after {args.warmup}{extra}\n"
    )
    print(f"{'setting':22s} {'steps/s':>8s} {'samples/s':>10s} {'vs ZeRO-0 plain':>16s} {'first loss':>11s}")
    for name in names:
        r = results[name]
        ratio = r["steps_per_s"] / base["steps_per_s"]
        print(f"{name:22s} {r['steps_per_s']:8.2f} {r['samples_per_s']:10.1f} {ratio:15.2f}x {r['first_loss']:11.6f}")
    w = max(20, 2 + max(len(n) for n in names))
    print(f"\nms per step (rank 0){'':30s}" + "".join(f"{n:>{w}s}" for n in names))
    for key, label in ROWS:
        vals = [results[n]["ms_per_step"].get(key) for n in names]
        if all(v is None or abs(v) < 0.05 for v in vals):
            continue
        print(f"{label:50s}" + "".join(f"{'-' if v is None else f'{v:.1f}':>{w}s}" for v in vals))
    calls = "".join(f"{results[n]['collective_calls_per_step']:{w}.0f}" for n in names)
    print(f"{'collectives: calls':50s}{calls}")
    step = "".join(f"{1000 / results[n]['steps_per_s']:{w}.1f}" for n in names)
    print(f"{'step total (data included)':50s}{step}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny/composed.yaml")
    ap.add_argument("--data", default=None, help="demo data folder (generated into a temp dir if absent)")
    ap.add_argument("--batch", type=int, default=16, help="queries per rank per step (train.batch_size)")
    ap.add_argument("--chunk", type=int, default=4, help="train.gradcache_chunk_size of the GradCache settings")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override key=value (repeatable)")
    ap.add_argument("--set3", action="append", default=[], help="a recipe override for the ZeRO-3 settings only")
    ap.add_argument("--per-module", action="store_true", help="also ZeRO-3 without zero3_step (as before #16)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_zero_"))
    if args.data is None or not (Path(args.data) / "train.yaml").is_file():
        from mmembed.data.synthetic import generate

        args.data = str(Path(args.data) if args.data else tmp / "demo")
        generate(args.data, n_train=max(200, 2 * args.batch * (args.warmup + args.steps)), n_eval=12, image_size=64)
    out = tmp / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", __file__, "--worker", f"--out={out}", f"--data={args.data}"]
    cmd += [f"--batch={args.batch}", f"--chunk={args.chunk}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    cmd += ["--per-module"] if args.per_module else []
    cmd += [f"--recipe={args.recipe}", *(f"--set={s}" for s in args.set), *(f"--set3={s}" for s in args.set3)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if not out.is_file():  # judged by the results file: two-rank runs can abort at exit after writing them
        (tmp / "ranks.log").write_text(proc.stdout + proc.stderr)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln and "elastic" not in ln]
        raise SystemExit(
            f"the ranks wrote no results (exit {proc.returncode}), log {tmp / 'ranks.log'}:\n" + "\n".join(errors[-8:])
        )
    results = json.loads(out.read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    report(results, args)


def _free_port() -> int:
    from mmembed.train.deepspeed_utils import free_port

    return free_port()


if __name__ == "__main__":
    main()

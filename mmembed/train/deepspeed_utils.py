"""DeepSpeed glue: config building, process-group start, and the engine calls for several backwards per step.

Measured on DeepSpeed 0.19.8 (docs/deepspeed.md, "GradCache under DeepSpeed 0.19.8"):

- Without a ``gradient_clipping`` key the engine clips to 1.0; the config built here always sets it.
- With several ``engine.backward`` calls per optimizer step (GradCache chunks) and
  ``gradient_accumulation_steps: 1``, calling ``engine.set_gradient_accumulation_boundary(is_last)``
  before each backward is exact on ZeRO 0, 1, 2 and 3 (plain repeated backwards overwrite the earlier
  chunks' gradients on ZeRO 1/2; ``coalesce_grad_reduction`` is refused on stage 0).
- ``loss.backward()`` is refused on ZeRO 0: use ``engine.backward``.
- Client optimizers need ``zero_allow_untested_optimizer`` on ZeRO 1-3.
- ZeRO-3 runs Python hooks on every submodule in every forward and backward (gather, release, trace
  bookkeeping) and reduce-scatters the gradients after every backward, which costs a GradCache step
  once per chunk and pass. ``zero3_step`` gathers the parameters once per step, suspends those hooks
  and reduces once (docs/deepspeed.md, "ZeRO-3 step cost").

``deepspeed`` is imported inside the functions, so importing this module is cheap and the inference
path never pulls DeepSpeed in.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "build_deepspeed_config",
    "engine_backward",
    "gradcache_engine_hooks",
    "Zero3StepMode",
    "zero3_step",
    "init_distributed",
    "free_port",
    "gathered_state_dict",
]

PRECISIONS = ("fp32", "bf16")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_deepspeed_config(
    *,
    micro_batch_size: int,
    zero_stage: int = 0,
    precision: str = "fp32",
    gradient_clipping: float = 0.0,
    gradient_accumulation_steps: int = 1,
    zero_allow_untested_optimizer: bool = True,
    stage3_param_persistence_threshold: int | None = None,
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    steps_per_print: int = 10**9,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A DeepSpeed config dict for one rank's settings.

    Args:
        micro_batch_size: ``train_micro_batch_size_per_gpu`` (queries per rank per optimizer step;
            DeepSpeed only checks the arithmetic, never tensor sizes). ``train_batch_size`` is left
            for DeepSpeed to derive (micro x accumulation x world size).
        zero_stage: 0, 1, 2 or 3 (``train.zero_stage``).
        precision: ``fp32`` or ``bf16`` (``train.precision``; fp16 loss scaling is not supported here).
        gradient_clipping: max global gradient norm; 0.0 disables. Always written, because 0.19.8
            clips to 1.0 when the key is absent.
        gradient_accumulation_steps: keep 1 with GradCache (the chunks are not accumulation steps;
            the boundary is set per backward, see ``gradcache_engine_hooks``).
        zero_allow_untested_optimizer: needed for client (torch) optimizers on ZeRO 1-3.
        stage3_param_persistence_threshold: ZeRO-3 only; parameters with fewer elements are not
            partitioned (DeepSpeed's default 1e5). Tests with tiny models set 0.
        optimizer, scheduler: DeepSpeed ``optimizer`` / ``scheduler`` sections, if the optimizer is
            not passed to ``deepspeed.initialize`` as an object.
        steps_per_print: DeepSpeed's own progress print interval (the training loop logs itself).
        extra: merged last (recursively) to set anything else.

    Returns:
        The config dict for ``deepspeed.initialize(config=...)``.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if micro_batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {micro_batch_size}")
    if gradient_clipping < 0:
        raise ValueError(f"gradient_clipping must be >= 0 (0 disables), got {gradient_clipping}")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if stage3_param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = int(stage3_param_persistence_threshold)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "gradient_clipping": float(gradient_clipping),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": bool(zero_allow_untested_optimizer),
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": int(steps_per_print),
        "wall_clock_breakdown": False,
    }
    if optimizer is not None:
        config["optimizer"] = copy.deepcopy(optimizer)
    if scheduler is not None:
        config["scheduler"] = copy.deepcopy(scheduler)
    return _merge(config, extra) if extra else config


def engine_backward(engine: Any, loss: torch.Tensor, *, is_last: bool = True) -> None:
    """One backward through the engine, marking whether it closes the optimizer step.

    Sets ``engine.set_gradient_accumulation_boundary(is_last)`` (the flag persists until set again),
    then ``engine.backward(loss)``: gradients of earlier backwards are kept and reduced across ranks
    once, at the backward with ``is_last=True``. A plain (non-GradCache) step is one call with
    ``is_last=True``; then ``engine.step()``.
    """
    engine.set_gradient_accumulation_boundary(is_last)
    engine.backward(loss)


def gradcache_engine_hooks(engine: Any) -> dict[str, Callable[..., Any]]:
    """``backward_fn`` and ``before_backward`` for ``gradcache_step`` under a DeepSpeed engine.

    Usage: ``gradcache_step(encode, qb, tb, loss_fn, chunk, **gradcache_engine_hooks(engine))``, then
    ``engine.step()``. Exact on ZeRO 0-3 with ``gradient_accumulation_steps: 1`` (tests/multirank).
    """

    def before_backward(chunk_index: int, is_last: bool) -> None:
        engine.set_gradient_accumulation_boundary(is_last)

    return {"backward_fn": engine.backward, "before_backward": before_backward}


@dataclass(frozen=True)
class Zero3StepMode:
    """What ``zero3_step`` does for one step: ``gathered`` (all parameters gathered once, ZeRO-3's module hooks
    suspended) and ``coalesced`` (one gradient reduction after the last backward)."""

    gathered: bool = False
    coalesced: bool = False


@contextlib.contextmanager
def zero3_step(engine: Any, *, gather: bool | None = None, coalesce: bool | None = None) -> Iterator[Zero3StepMode]:
    """Run one optimizer step's forwards and backwards (plain or GradCache) with ZeRO-3's per-module cost paid once.

    Without it, ZeRO-3 gathers and releases each submodule's parameters in Python hooks in every forward and
    backward, and reduce-scatters all gradients after every ``engine.backward``: a GradCache step pays that once
    per chunk and pass (``tools/bench_train.py --zero-breakdown``). Inside this context:

    - ``gather``: every parameter is gathered once (``deepspeed.zero.GatheredParameters``, no modifier rank) and
      DeepSpeed's module hooks are removed for the step, then registered again on exit (what DeepSpeed's own
      ``unwrap_model_for_generation`` does, with the re-registration in a ``finally``). The forwards and
      backwards then run on full tensors like ZeRO-0; gradients still reach the ZeRO-3 optimizer through its
      per-parameter gradient hooks. Costs the full parameters in memory for the step.
    - ``coalesce``: ``engine.coalesce_grad_reduction()``: gradients stay on the parameters until the block exits,
      then one reduce-scatter. Costs full-size gradients of the trainable parameters for the step.

    ``None`` (the default) decides by DeepSpeed's own bound on resident parameters,
    ``zero_optimization.stage3_max_live_parameters`` (default 1e9): gather when the model has at most that many
    elements, coalesce when its trainable parameters do. Set it lower in a ``train.deepspeed`` JSON to keep
    ZeRO-3's per-module gathering for a model that must not be resident at once. Stages 0-2: a no-op.

    Exact: the same gradients as the per-module path (``tests/multirank``). ``engine.step()`` comes after the
    block. Every rank must take the same decision: they do, since it depends on the model and config only.
    """
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)  # DeepSpeedZeRoOffload
    if engine.zero_optimization_stage() != 3 or offload is None:
        yield Zero3StepMode()
        return
    params = list(engine.module.parameters())
    limit = engine.zero_max_live_parameters()
    if gather is None:
        gather = sum(p.ds_numel for p in params) <= limit
    if coalesce is None:
        coalesce = sum(p.ds_numel for p in params if p.requires_grad) <= limit
    # coalesce_grad_reduction refuses unmanaged accumulation and optimizer wrappers without the flag it sets
    coalesce = bool(coalesce) and engine.managed_gradient_accumulation()
    coalesce = coalesce and hasattr(engine.optimizer, "_coalesce_grad_reduction")
    with contextlib.ExitStack() as stack:
        if gather:
            stack.enter_context(_gathered_without_hooks(offload, params))
        if coalesce:  # inside the gathering: the reduction runs before the parameters are partitioned again
            stack.enter_context(engine.coalesce_grad_reduction())
        yield Zero3StepMode(gathered=gather, coalesced=coalesce)


@contextlib.contextmanager
def _gathered_without_hooks(offload: Any, params: list[nn.Parameter]) -> Iterator[None]:
    """All ``params`` gathered and ``offload``'s module hooks removed; both undone on exit, also after an error."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for handle in offload.forward_hooks + offload.backward_hooks:
            handle.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:  # hooks back (this also invalidates the parameter trace: the next hooked forward records it again)
            offload._register_deepspeed_module(offload.module)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str | None = None) -> None:
    """Start DeepSpeed's process group, also on one process without a launcher.

    Launchers (``deepspeed``, ``torchrun``) set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``;
    without them ``deepspeed.init_distributed`` would try MPI discovery and fail, so a single-process
    world on a free local port is set up instead. The backend defaults to DeepSpeed's choice (gloo on CPU).
    """
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend=backend)


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of ``module``'s parameters and buffers, also when ZeRO-3 partitioned them.

    Collective under ZeRO-3: call it on every rank.
    """
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

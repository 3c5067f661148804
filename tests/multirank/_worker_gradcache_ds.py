"""Worker (run under torchrun, 2 CPU ranks): GradCache through the DeepSpeed engine on ZeRO 0, 1, 2 and 3.

For each stage, one SGD step from the same initial weights is taken several ways and the updated weights
compared with a single-process plain-torch step on the global batch that replays each rank's RNG stream
(the ground truth):

- ``gradcache``: chunk 2, boundary flag set before each backward (``gradcache_engine_hooks``);
- ``plain``: the same step without GradCache (same chunked forward, so the same dropout masks, one graph,
  one backward);
- ``gradcache_learnable``: a learnable temperature held by the engine's model (loss as a submodule);
- ``gradcache_clip``: gradient clipping active (clipped reference computed with ``clip_grad_norm_``);
- ``gradcache_bf16``: bf16 precision, compared loosely (bf16 rounding) to the fp32 reference;
- ``control_no_boundary`` (ZeRO 2): GradCache without the boundary flag, measured wrong in docs/deepspeed.md,
  shows that the comparison can fail;
- ZeRO 3 only, inside ``zero3_step`` (what the training loop does): ``z3step_gradcache`` and ``z3step_plain``
  (parameters gathered once, module hooks off, one coalesced reduction), ``z3step_learnable``,
  ``z3step_bf16``, ``z3step_two_steps`` (two steps in a row against two reference steps: the coalesced
  reduction must not carry the first step's gradients into the second) and ``z3step_coalesce_only`` (hooks on,
  one reduction: the path of a model too large to gather whose trainable parameters are not);
  ``z3step_after_error``: an error inside ``zero3_step`` (a skipped step), then a per-module GradCache step: the
  module hooks and the partitioning must be back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from functools import partial

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import encode_like_ranks, make_global_batch, make_model, max_rel_diff, shard, write_result  # noqa: E402

from mmembed import dist as mdist  # noqa: E402
from mmembed.losses import InfoNCELoss  # noqa: E402
from mmembed.train.deepspeed_utils import (  # noqa: E402
    build_deepspeed_config,
    engine_backward,
    gathered_state_dict,
    gradcache_engine_hooks,
    init_distributed,
    zero3_step,
)
from mmembed.train.gradcache import gradcache_step  # noqa: E402

LOCAL_B, NEGATIVES, CHUNK, LR, SEED, CLIP = 4, 1, 2, 1.0, 100, 0.05
MODES = {
    "gradcache": {},
    "plain": {},
    "gradcache_learnable": {"learnable": True},
    "gradcache_clip": {"clip": CLIP},
    "gradcache_bf16": {"precision": "bf16"},
}
Z3STEP = {"gather": None, "coalesce": None}  # zero3_step's own decision (the tiny encoder: gather and coalesce)
MODES_ZERO3 = {
    "z3step_gradcache": {"z3": Z3STEP},
    "z3step_plain": {"z3": Z3STEP},
    "z3step_learnable": {"z3": Z3STEP, "learnable": True},
    "z3step_bf16": {"z3": Z3STEP, "precision": "bf16"},
    "z3step_two_steps": {"z3": Z3STEP, "steps": 2},
    "z3step_coalesce_only": {"z3": {"gather": False, "coalesce": True}},
    "z3step_after_error": {"fail_first": True},
}


class EncoderWithLoss(nn.Module):
    """The engine's model: the encoder's forward, plus the loss as a submodule so its temperature is trained."""

    def __init__(self, learnable: bool) -> None:
        super().__init__()
        self.encoder = make_model(0)
        self.loss = InfoNCELoss(temperature=0.05, learnable_temperature=learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def reference_step(world: int, learnable: bool = False, clip: float = 0.0, steps: int = 1) -> dict[str, torch.Tensor]:
    """Plain torch, one process, global batch: the ground truth for the updated weights (``steps`` SGD steps on
    the same batch, each replaying the ranks' RNG streams from the same seeds, as ``engine_step`` does)."""
    model = EncoderWithLoss(learnable)
    model.loss.gather = False
    q, t = make_global_batch(LOCAL_B * world, NEGATIVES)
    shards = [shard(q, t, [LOCAL_B] * world, r) for r in range(world)]
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        qe, te = encode_like_ranks(model, shards, CHUNK, SEED)
        model.loss(qe, te).backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert norm > 2 * clip, "clipping must be active for the test to mean something"
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def engine_step(
    stage: int,
    mode: str,
    learnable: bool = False,
    clip: float = 0.0,
    precision: str = "fp32",
    z3: dict | None = None,
    steps: int = 1,
    fail_first: bool = False,
):
    import deepspeed

    rank, world = mdist.get_rank(), mdist.get_world_size()
    model = EncoderWithLoss(learnable)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = build_deepspeed_config(
        micro_batch_size=LOCAL_B,
        zero_stage=stage,
        precision=precision,
        gradient_clipping=clip,
        # tiny model: partition every parameter under ZeRO-3, the temperature included (the loss is a
        # submodule called outside the model's forward: ZeRO-3's module hooks gather it)
        stage3_param_persistence_threshold=0,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    q, t = make_global_batch(LOCAL_B * world, NEGATIVES)
    q, t = shard(q, t, [LOCAL_B] * world, rank)
    if precision == "bf16":
        q, t = q.bfloat16(), t.bfloat16()
    loss_fn = partial(engine.module.loss, return_stats=True)
    after_error = None
    if fail_first:  # as the loop's NonFiniteLoss: raised mid-step, caught, no optimizer step
        offload = engine.optimizer.parameter_offload
        hooks = len(offload.forward_hooks) + len(offload.backward_hooks)
        try:
            with zero3_step(engine), torch.no_grad():
                engine(q[:CHUNK])
                raise FloatingPointError("loss is nan")
        except FloatingPointError:
            pass
        after_error = {
            "hooks_restored": len(offload.forward_hooks) + len(offload.backward_hooks) == hooks > 0,
            "partitioned": all(p.ds_status.name == "NOT_AVAILABLE" for p in engine.module.parameters()),
        }
    for _ in range(steps):
        torch.manual_seed(SEED + rank)
        with zero3_step(engine, **z3) if z3 is not None else contextlib.nullcontext() as z3_mode:
            if mode == "control_no_boundary":
                loss = gradcache_step(engine, q, t, loss_fn, CHUNK, backward_fn=engine.backward).loss
            elif "plain" not in mode:
                loss = gradcache_step(engine, q, t, loss_fn, CHUNK, **gradcache_engine_hooks(engine)).loss
            else:  # plain: same chunked forward (same dropout masks), one graph, one backward
                qe = torch.cat([engine(c) for c in q.split(CHUNK)])
                te = torch.cat([engine(c) for c in t.split(CHUNK)])
                scaled, stats = loss_fn(qe, te)
                engine_backward(engine, scaled, is_last=True)
                loss = stats["loss"]
        engine.step()
    after = {k: v.float() for k, v in gathered_state_dict(engine.module).items()}
    engine.destroy()
    used = None if z3_mode is None else {"gathered": z3_mode.gathered, "coalesced": z3_mode.coalesced}
    return before, after, float(loss), used or after_error


def compare(before, after, ref) -> dict:
    upd = {k: after[k] - before[k] for k in ref}
    ref_upd = {k: ref[k] - before[k] for k in ref}
    return {"rel_weights_vs_reference": max_rel_diff(after, ref), "rel_update_vs_reference": max_rel_diff(upd, ref_upd)}


def main() -> None:
    start = time.time()
    init_distributed()
    world = mdist.get_world_size()
    refs = {
        "plain": reference_step(world),
        "learnable": reference_step(world, learnable=True),
        "clip": reference_step(world, clip=CLIP),
        "two_steps": reference_step(world, steps=2),
    }
    results: dict = {"world_size": world, "stages": {}}
    for stage in (0, 1, 2, 3):
        row: dict = {}
        modes = dict(MODES, **({"control_no_boundary": {}} if stage == 2 else MODES_ZERO3 if stage == 3 else {}))
        weights = {}
        for mode, kwargs in modes.items():
            t0 = time.time()
            before, after, loss, used = engine_step(stage, mode, **kwargs)
            weights[mode] = after
            kind = "learnable" if kwargs.get("learnable") else "clip" if kwargs.get("clip") else "plain"
            ref = refs["two_steps" if kwargs.get("steps", 1) == 2 else kind]
            row[mode] = {"loss": loss, **compare(before, after, ref), "seconds": round(time.time() - t0, 2)}
            if used is not None:
                row[mode]["zero3_step"] = used
        row["rel_weights_gradcache_vs_plain"] = max_rel_diff(weights["gradcache"], weights["plain"])
        results["stages"][str(stage)] = row
        mdist.barrier()
    results["seconds"] = round(time.time() - start, 2)
    write_result("gradcache_ds", results)
    mdist.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

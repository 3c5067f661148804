"""Worker (run under torchrun, 2 CPU ranks over gloo, no DeepSpeed): cross-rank InfoNCE equivalence.

Each case compares 2 ranks x B queries (loss gathered across ranks, gradients averaged over ranks as
DDP / DeepSpeed do) with 1 process x 2B queries (the same global batch, dropout masks replayed).
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import encode_like_ranks, grads_of, make_global_batch, make_model, max_rel_diff, shard, write_result  # noqa: E402

from mmembed import dist as mdist  # noqa: E402
from mmembed.losses import InfoNCELoss  # noqa: E402
from mmembed.train.gradcache import gradcache_step  # noqa: E402

SEED = 100
CASES = {
    "default": dict(loss={}, sizes=[4, 4], negatives=1),
    "no_hard_negatives": dict(loss={}, sizes=[4, 4], negatives=0),
    "in_batch_off": dict(loss={"in_batch_negatives": False, "temperature": 0.5}, sizes=[4, 4], negatives=2),
    "symmetric_fn_mask": dict(
        loss={"symmetric": True, "false_negative_margin": 0.0, "temperature": 0.1}, sizes=[4, 4], negatives=1
    ),
    "learnable_temperature": dict(loss={"learnable_temperature": True, "temperature": 0.05}, sizes=[4, 4], negatives=1),
    "unequal_sizes": dict(loss={}, sizes=[3, 5], negatives=1),
    "negative_mask": dict(loss={"false_negative_margin": 0.2}, sizes=[4, 4], negatives=2, mask=True),
    "gradcache_chunk2": dict(loss={"learnable_temperature": True}, sizes=[4, 4], negatives=1, chunk=2),
}


def run_case(spec: dict) -> dict:
    rank, world = mdist.get_rank(), mdist.get_world_size()
    sizes, chunk = spec["sizes"], spec.get("chunk")
    q, t = make_global_batch(sum(sizes), spec["negatives"])
    q_local, t_local = shard(q, t, sizes, rank)
    mask = local_mask = None
    if spec.get("mask"):  # some padding slots, in both ranks' shards
        mask = torch.ones(q.shape[0], spec["negatives"], dtype=torch.bool)
        mask[1, :] = False
        mask[6, 0] = False
        start = sum(sizes[:rank])
        local_mask = mask[start : start + sizes[rank]]

    # distributed: gathered loss, then gradients averaged over ranks
    model = make_model(0)
    loss_mod = InfoNCELoss(**spec["loss"])
    torch.manual_seed(SEED + rank)
    if chunk:
        loss_fn = partial(loss_mod, negative_mask=local_mask, return_stats=True)
        res = gradcache_step(model, q_local, t_local, loss_fn, chunk)
        loss, stats = res.loss, res.stats
        scaled = None
    else:
        scaled, stats = loss_mod(model(q_local), model(t_local), negative_mask=local_mask, return_stats=True)
        scaled.backward()
        loss = stats["loss"]
    grads = grads_of(model)
    if loss_mod.log_scale is not None:
        grads["log_scale"] = loss_mod.log_scale.grad.detach().clone()
    for g in grads.values():
        dist.all_reduce(g)
        g /= world

    # reference: one process, the global batch, no gather
    ref_model = make_model(0)
    ref_loss_mod = InfoNCELoss(**{**spec["loss"], "gather": False})
    qe, te = encode_like_ranks(ref_model, [shard(q, t, sizes, r) for r in range(world)], chunk, SEED)
    ref_loss, ref_stats = ref_loss_mod(qe, te, negative_mask=mask, return_stats=True)
    ref_loss.backward()
    ref_grads = grads_of(ref_model)
    if ref_loss_mod.log_scale is not None:
        ref_grads["log_scale"] = ref_loss_mod.log_scale.grad.detach().clone()

    return {
        "loss": float(loss),
        "ref_loss": float(ref_loss),
        "scaled_over_loss": None if scaled is None else float(scaled / stats["loss"]),
        "grad_scale": stats["grad_scale"],
        "accuracy": float(stats["accuracy"]),
        "ref_accuracy": float(ref_stats["accuracy"]),
        "masked": stats["masked"],
        "ref_masked": ref_stats["masked"],
        "num_queries": stats["num_queries"],
        "padded_targets": stats["padded_targets"],
        "ref_padded_targets": ref_stats["padded_targets"],
        "grad_keys": sorted(grads),
        "rel_grad": max_rel_diff(grads, ref_grads),
    }


def gather_checks() -> dict:
    rank, world = mdist.get_rank(), mdist.get_world_size()
    n = 2 + rank  # unequal first dims: 2, 3, ...
    x = torch.full((n, 3), float(rank + 1), requires_grad=True)
    g = mdist.all_gather_with_local_grad(x)
    (g * torch.arange(1, g.shape[0] + 1.0)[:, None]).sum().backward()
    offset = sum(2 + r for r in range(rank))
    expected_rows = [float(r + 1) for r in range(world) for _ in range(2 + r)]
    return {
        "values_ok": g[:, 0].tolist() == expected_rows,
        "local_grad_ok": torch.equal(x.grad[:, 0], torch.arange(offset + 1.0, offset + n + 1)),
        "broadcast": mdist.broadcast_object({"from": rank}),
        "mean": float(mdist.all_reduce_mean(torch.tensor(float(rank)))),
        "world_size": world,
    }


def main() -> None:
    start = time.time()
    dist.init_process_group("gloo")
    results = {"gather": gather_checks(), "cases": {name: run_case(spec) for name, spec in CASES.items()}}
    results["seconds"] = round(time.time() - start, 2)
    write_result("loss_dist", results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

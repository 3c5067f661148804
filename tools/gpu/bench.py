"""The GPU run: bf16 encode throughput, GradCache training throughput and MFU on the Qwen2-VL-2B architecture.

Random weights, built offline from a config (no hub), so it runs on the accelerator machine with nothing but torch,
transformers and mmembed. Prints, side by side in one run:

- encode images/s: a plain transformers forward of the HF base model, ``model(batch)`` of mmembed (the same model,
  processor batch given), ``model.encode`` (end to end: decoding, processing, forward), and encode with AIM
  merging (keep 0.5) + pruning;
- train samples/s and peak memory at global batch ``--batch`` (1024 by default) with mmembed's GradCache step at the
  largest chunk that fits (tried from ``--chunks``), next to a plain VLM2Vec-style loop written here (GradCache as
  VLM2Vec's trainer runs it: no-grad forward per chunk, loss on the cached reps, re-forward + backward per chunk, on
  the same HF model);
- MFU = model FLOPs per step / step time / device peak (bf16 dense), FLOPs 8 * LLM params * tokens per GradCache
  step (no-grad forward 2N + forward 2N + backward 4N; vision tower and attention left out: a lower bound).

``--dry-run``: the tiny Qwen2-VL on CPU in fp32, 2 steps, batch 8 (the suite runs it so the script cannot rot).
Writes ``--out`` (JSON) too. tools/gpu/bench.sh is the entry point on the accelerator machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from native_presets import RANDOM_INIT  # noqa: E402  (tools/ is not a package)

#: Qwen2-VL-2B-Instruct's architecture (its config.json; special-token ids those of the tiny processor)
QWEN2VL_2B: dict[str, Any] = RANDOM_INIT["Qwen/Qwen2-VL-2B-Instruct"]
#: dense bf16 peak FLOP/s by device name (vendor data sheets, SXM parts)
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def recipe(config: dict[str, Any], dtype: str, pixels: int, **extra: Any) -> dict[str, Any]:
    model = {
        "backbone": {
            "type": "qwen2_vl",
            "config": config,
            "processor": "tiny",
            "dtype": dtype,
            "min_pixels": pixels,
            "max_pixels": pixels,
        },
        "pooler": {"type": "last_token"},
        "normalize": True,
        "padding_side": "left",
        **extra,
    }
    return {"model": model}


def make_rows(n: int, size: int, seed: int = 0) -> tuple[list[Any], list[str], list[str]]:
    """``n`` random images, their query texts and ``n`` caption targets (varied lengths)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    images = [Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")) for _ in range(min(n, 16))]
    images = [images[i % len(images)] for i in range(n)]
    words = "a red blue green square circle cat dog on the left of right under".split()
    texts = [" ".join(rng.choice(words, size=int(rng.randint(4, 24)))) for _ in range(n)]
    return images, ["what is in the image"] * n, texts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Seconds per call of ``fn`` (one warm-up call first)."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encode_bench(model: Any, images: list[Any], instr: list[str], device: torch.device, repeats: int) -> dict:
    from mmembed.types import Side

    sides = [Side(text=None, images=[im], instruction=q) for im, q in zip(images, instr)]
    batch = model.processor.to(model.processor(sides), device)
    hf = model.backbone.model
    keys = [k for k in model.backbone.model_keys if k in batch]

    def plain() -> None:
        with torch.no_grad():
            out = hf(**{k: batch[k] for k in keys}, use_cache=False).last_hidden_state
            F.normalize(out[:, -1].float(), dim=-1)

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    def end_to_end() -> None:
        model.encode(images=images, instruction=instr[0], batch_size=len(images))

    n = len(images)
    tokens = int(batch["attention_mask"].sum())
    return {
        "plain transformers forward": n / timed(plain, device, repeats),
        "mmembed model(batch)": n / timed(forward, device, repeats),
        "mmembed model.encode (end to end)": n / timed(end_to_end, device, repeats),
        "_tokens_per_batch": tokens,
    }


def train_bench(model: Any, rows: tuple, batch: int, chunks: list[int], device: torch.device, steps: int) -> dict:
    """mmembed's gradcache_step vs a plain VLM2Vec-style GradCache loop, at the largest chunk that fits."""
    from mmembed.losses import InfoNCELoss
    from mmembed.train.gradcache import gradcache_step
    from mmembed.types import Side

    images, instr, texts = rows
    q_sides = [Side(text=None, images=[im], instruction=i) for im, i in zip(images[:batch], instr[:batch])]
    t_sides = [Side(text=t) for t in texts[:batch]]
    qb = model.processor.to(model.processor(q_sides), device)
    tb = model.processor.to(model.processor(t_sides), device)
    loss_fn = InfoNCELoss(temperature=0.02, mask_same_targets=False, gather=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    hf = model.backbone.model
    keys = model.backbone.model_keys

    def reps(b: dict) -> torch.Tensor:  # VLM2Vec's encode_input: last-token hidden state, normalized
        out = hf(**{k: b[k] for k in keys if k in b}, use_cache=False).last_hidden_state
        return F.normalize(out[:, -1].float(), dim=-1)

    def plain_step(chunk: int) -> None:
        split = model.processor.split
        q_chunks, t_chunks = split(qb, chunk), split(tb, chunk)
        with torch.no_grad():
            q = torch.cat([reps(c) for c in q_chunks])
            t = torch.cat([reps(c) for c in t_chunks])
        q.requires_grad_(), t.requires_grad_()
        loss_fn(q, t).backward()
        for cs, g in ((q_chunks, q.grad), (t_chunks, t.grad)):
            for c, gc in zip(cs, g.split(chunk)):
                (reps(c) * gc).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def mm_step(chunk: int) -> None:
        gradcache_step(model, qb, tb, loss_fn, chunk, split_fn=model.processor.split)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out: dict[str, Any] = {}
    for chunk in chunks:
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            s_mm = timed(lambda c=chunk: mm_step(c), device, steps)
            mem_mm = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            s_plain = timed(lambda c=chunk: plain_step(c), device, steps)
            mem_plain = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            print(f"chunk {chunk}: out of memory, trying a smaller one", flush=True)
            continue
        tokens = int(qb["attention_mask"].sum() + tb["attention_mask"].sum())
        out = {
            "chunk": chunk,
            "mmembed samples/s": batch / s_mm,
            "plain loop samples/s": batch / s_plain,
            "mmembed peak GiB": mem_mm,
            "plain loop peak GiB": mem_plain,
            "mmembed s/step": s_mm,
            "plain s/step": s_plain,
            "_tokens_per_step": tokens,
        }
        break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU, fp32, 2 steps (for the test suite)")
    ap.add_argument("--batch", type=int, default=1024, help="global batch (queries; as many targets)")
    ap.add_argument("--chunks", default="128,64,32,16,8", help="GradCache chunk sizes to try, largest first")
    ap.add_argument("--encode-batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=448, help="square images; 448 px = 256 visual tokens")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    args = ap.parse_args(argv)

    from mmembed.backbones.qwen2_vl import TINY_QWEN2VL_CONFIG
    from mmembed.build import build_model

    if args.dry_run:
        device, dtype, config = torch.device("cpu"), "float32", TINY_QWEN2VL_CONFIG
        args.batch, args.encode_batch, args.image_size, args.chunks, args.steps = 8, 4, 56, "4", 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run", file=sys.stderr)
            return 2
        device, dtype, config = torch.device("cuda"), "bfloat16", QWEN2VL_2B
        torch.backends.cuda.matmul.allow_tf32 = True
    pixels = args.image_size * args.image_size
    t0 = time.perf_counter()
    with torch.device(device):  # random init on the device: on the CPU the 2B model takes minutes
        model = build_model(recipe(config, dtype, pixels)).to(device).eval()
    print(f"built {params(model) / 1e9:.2f}B params in {time.perf_counter() - t0:.1f} s on {device}", flush=True)
    rows = make_rows(max(args.batch, args.encode_batch), args.image_size)

    enc = encode_bench(model, rows[0][: args.encode_batch], rows[1][: args.encode_batch], device, args.steps)
    print(json.dumps({"encode images/s": enc}, default=float), flush=True)
    aim = recipe(config, dtype, pixels, merge={"type": "aim", "keep_ratio": 0.5}, prune={"type": "aim"})
    with torch.device(device):
        reduced = build_model(aim).to(device).eval()
    reduced.load_state_dict(model.state_dict(), strict=False)
    red = encode_bench(reduced, rows[0][: args.encode_batch], rows[1][: args.encode_batch], device, args.steps)
    enc["mmembed model(batch), AIM merge 0.5 + prune"] = red["mmembed model(batch)"]
    del reduced

    model.train()
    chunks = [int(c) for c in args.chunks.split(",")]
    train = train_bench(model, rows, args.batch, chunks, device, args.steps)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    n_llm = params(model.backbone.language_model())
    report: dict[str, Any] = {
        "device": name,
        "dtype": dtype,
        "params": params(model),
        "encode images/s": enc,
        "train": train,
    }
    if train:
        # GradCache per token: a no-grad forward (2N), the forward again (2N) and its backward (4N)
        flops = 8 * n_llm * train["_tokens_per_step"]
        report["train"]["model TFLOP/step"] = flops / 1e12
        if peak:
            report["train"]["MFU mmembed"] = flops / train["mmembed s/step"] / peak
            report["train"]["MFU plain loop"] = flops / train["plain s/step"] / peak
    print(json.dumps(report, indent=1, default=float))
    print("\n| encode | images/s |\n|---|---|")
    for k, v in enc.items():
        if not k.startswith("_"):
            print(f"| {k} | {v:.1f} |")
    if train:
        print(
            f"\n| train, batch {args.batch}, chunk {train['chunk']} | mmembed | plain VLM2Vec-style loop |"
            "\n|---|---|---|"
        )
        print(f"| samples/s | {train['mmembed samples/s']:.2f} | {train['plain loop samples/s']:.2f} |")
        print(f"| peak GiB | {train['mmembed peak GiB']:.1f} | {train['plain loop peak GiB']:.1f} |")
        if peak:
            print(f"| MFU | {train['MFU mmembed']:.3f} | {train['MFU plain loop']:.3f} |")
    args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0 if train else 1


if __name__ == "__main__":
    raise SystemExit(main())

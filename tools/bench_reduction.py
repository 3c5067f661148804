"""Visual-token reduction on CPU: tokens into the LLM, analytic LLM FLOPs, encode time and peak memory.

Settings (AIM, arXiv 2412.03248; docs/algorithms.md §5): no reduction, ``merge`` to 50% and 25% of each image's
tokens, ``prune`` (progressive, inside the LLM; pruned rows removed) and ``aim`` (merge 25% + prune). Each
backbone's settings are timed in one process with interleaved runs (min and median reported, so load from
other processes on a shared machine hits every setting alike); peak RSS comes from a fresh process per
setting. Models are random-init (no download): timm ``test_vit`` at 384 px (24 x 24 = 576 visual tokens per
image, LLaVA-1.5's count) + a Qwen2 backbone, ``tiny`` (2 layers, 64 wide) and ``mid`` (12 layers, 512 wide).

FLOPs are analytic (LLM-Viewer style, as AIM): per layer with n tokens, ``2n(d*q + 2d*kv + q*d) + 4n^2*q`` for
attention (full n x n scores, as SDPA computes them) and ``6n*d*ff`` for the gated MLP, summed over the batch rows
and over layers with each layer's own token count (the prune schedule). Pruning's scoring pass (one extra q/k
projection and an n x n softmax at each layer where the count drops) is included.

    python tools/bench_reduction.py                  # both backbones, batch 8, 5 timed runs
    python tools/bench_reduction.py --backbones mid --batch 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BACKBONES = {
    "tiny": [],
    "mid": [
        "model.backbone.config.hidden_size=512",
        "model.backbone.config.intermediate_size=1536",
        "model.backbone.config.num_hidden_layers=12",
        "model.backbone.config.num_attention_heads=8",
        "model.backbone.config.num_key_value_heads=4",
    ],
}
COMMON = ["model.vision.image_size=384", "model.max_length=64"]


def settings(num_layers: int) -> dict[str, list[str]]:
    """Reducer overrides per setting; prune starts after the first quarter of the layers and reaches 0 at 3/4."""
    start, step = max(0, num_layers // 4), 2.0 / num_layers
    prune = f"start_layer: {start}, step: {step}"
    return {
        "none": [],
        "merge 50%": ["model.merge={type: aim, keep_ratio: 0.5}"],
        "merge 25%": ["model.merge={type: aim, keep_ratio: 0.25}"],
        "prune": [f"model.prune={{type: aim, {prune}}}"],
        "merge 25% + prune": ["model.merge={type: aim, keep_ratio: 0.25}", f"model.prune={{type: aim, {prune}}}"],
    }


def llm_flops(cfg, counts: list[int]) -> float:
    """Analytic forward FLOPs of the decoder for one row whose layer l sees ``counts[l]`` tokens."""
    d, ff = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * (d // cfg.num_attention_heads)
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    total = 0.0
    for n in counts:
        total += 2 * n * (d * q + 2 * d * kv + q * d) + 4 * n * n * q + 6 * n * d * ff
    return total


def _inputs(batch: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (400, 400, 3), dtype="uint8")) for _ in range(batch)]
    texts = [f"what is shown in the picture number {i}? answer with one word" for i in range(batch)]
    return texts, images


def _build(backbone: str, setting: str, state: dict | None = None):
    import torch

    import mmembed

    torch.manual_seed(0)
    n_layers = 2 if backbone == "tiny" else 12
    overrides = COMMON + BACKBONES[backbone] + settings(n_layers)[setting]
    model = mmembed.build_model(ROOT / "recipes/tiny/composed.yaml", overrides).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _count(model, texts, images, batch: int) -> dict:
    """Visual/text tokens of row 0 and analytic LLM FLOPs of the batch (schedule and scoring included)."""
    batch_in = model.processor(model._rows(texts, images, "Represent the given image with the following question:"))
    valid = batch_in["attention_mask"].bool()
    visual = (batch_in["input_ids"] == model.processor.placeholder_id) & valid
    n_vis, n_text = int(visual[0].sum()), int((valid & ~visual)[0].sum())
    cfg = model.backbone.model.config.get_text_config()
    ratios = list(model.prune.keep_ratios) if model.prune is not None else [1.0] * cfg.num_hidden_layers
    hd = cfg.hidden_size // cfg.num_attention_heads
    counts, score_flops, cur = [], 0.0, n_vis
    for ratio in ratios:  # tokens each layer sees, then the count after it
        counts.append(n_text + cur)
        new = round(n_vis * ratio)
        if new < cur:  # scoring pass: q/k projections, n x n logits, softmax and 5 PageRank products
            n = n_text + cur
            score_flops += 2 * n * cfg.hidden_size * (cfg.num_attention_heads + cfg.num_key_value_heads) * hd
            score_flops += 2 * n * n * cfg.num_attention_heads * hd + 5 * 2 * n * n * cfg.num_attention_heads
        cur = min(cur, new)
    flops = batch * (llm_flops(cfg, counts) + score_flops)
    return {"visual_in": n_vis, "text": n_text, "last_layer_tokens": counts[-1], "gflops": flops / 1e9}


def run_timing(backbone: str, batch: int, repeats: int) -> dict:
    """All settings of one backbone in one process, runs interleaved (the machine may be shared): min and median."""
    texts, images = _inputs(batch)
    names = list(settings(2 if backbone == "tiny" else 12))
    models = {}
    for name in names:
        models[name] = _build(backbone, name, None if not models else models[names[0]].state_dict())
    out = {name: {**_count(m, texts, images, batch), "times": []} for name, m in models.items()}
    for m in models.values():
        m.encode(texts=texts, images=images, batch_size=batch)  # warm-up
    for _ in range(repeats):
        for name, m in models.items():
            t = time.perf_counter()
            m.encode(texts=texts, images=images, batch_size=batch)
            out[name]["times"].append(time.perf_counter() - t)
    return out


def run_memory(backbone: str, setting: str, batch: int) -> float:
    """Peak RSS (MB) of a fresh process that builds the model and encodes one batch."""
    import resource

    texts, images = _inputs(batch)
    _build(backbone, setting).encode(texts=texts, images=images, batch_size=batch)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sub(*args: str) -> dict | float | None:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"FAILED {args}: {proc.stderr[-800:]}")
        return None
    return json.loads(line[7:])


def run_quality(model_dir: str, data: str) -> dict[str, float]:
    """Held-out hit@1 (mean over tasks) of a trained model under each setting (training-free reduction, as AIM).

    The saved config is rebuilt with the setting's merge/prune slots and the trained weights loaded (they have none).
    """
    from omegaconf import OmegaConf

    import mmembed
    from mmembed.build import build_from_cfg
    from mmembed.config import model_cfg_from_dict, upgrade_model_dict
    from mmembed.eval import evaluate, load_eval_sets, read_task_meta

    base = mmembed.load(model_dir)
    state = base.state_dict()
    meta = json.loads((Path(model_dir) / "mmembed_config.json").read_text())["model"]
    sets = load_eval_sets(data, placeholder=base.processor.placeholder, strict=False)
    task_meta = read_task_meta(data)
    out = {}
    for name, overrides in settings(base.backbone.num_layers).items():
        cfg_dict = {
            **meta,
            "backbone": {
                **meta["backbone"],
                "name": str(Path(model_dir) / "backbone"),
                "tokenizer": str(Path(model_dir) / "tokenizer"),
            },
        }
        cfg_dict = {k: v for k, v in upgrade_model_dict(cfg_dict).items() if k not in ("merge", "prune")}
        for o in overrides:  # "model.merge={...}" -> the merge slot
            cfg_dict.update(OmegaConf.to_container(OmegaConf.from_dotlist([o]))["model"])
        model = build_from_cfg(model_cfg_from_dict(cfg_dict)).eval()
        model.load_state_dict(state, strict=True)
        out[name] = evaluate(model, sets, batch_size=64, task_meta=task_meta)["overall"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="tiny,mid")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing", metavar="BACKBONE", help=argparse.SUPPRESS)
    ap.add_argument("--memory", nargs=2, metavar=("BACKBONE", "SETTING"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help="a trained model (e.g. runs/demo/final) for the held-out hit@1 column")
    ap.add_argument("--eval-data", default="data/demo/eval", help="its held-out eval set")
    args = ap.parse_args()
    if args.timing:
        print("RESULT " + json.dumps(run_timing(args.timing, args.batch, args.repeats)))
        return
    if args.memory:
        print("RESULT " + json.dumps(run_memory(*args.memory, args.batch)))
        return
    print(f"batch {args.batch}; encode time = min (median) of {args.repeats} interleaved runs; x = vs 'none'")
    header = (
        f"{'backbone':8} {'setting':18} {'vis tok':>7} {'last-layer tok':>14} {'LLM GFLOPs':>10} {'x':>5} "
        f"{'encode s (median)':>18} {'x':>5} {'peak RSS MB':>11}"
    )
    print(header)
    print("-" * len(header))
    for backbone in args.backbones.split(","):
        res = _sub("--timing", backbone, "--batch", str(args.batch), "--repeats", str(args.repeats))
        if res is None:
            continue
        base = res["none"]
        for name, r in res.items():
            mem = _sub("--memory", backbone, name, "--batch", str(args.batch))
            t, med = min(r["times"]), statistics.median(r["times"])
            print(
                f"{backbone:8} {name:18} {r['visual_in']:>7} {r['last_layer_tokens']:>14} {r['gflops']:>10.2f} "
                f"{base['gflops'] / r['gflops']:>5.1f} {t:>8.3f} ({med:>7.3f}) {min(base['times']) / t:>5.1f} "
                f"{mem or float('nan'):>11.0f}",
                flush=True,
            )
    if args.model_dir:
        quality = run_quality(args.model_dir, args.eval_data)
        print(
            f"\nheld-out hit@1 (mean over tasks) of {args.model_dir} on {args.eval_data}, "
            "reduction applied training-free:"
        )
        for name, v in quality.items():
            print(f"  {name:18} {v:.3f}")


if __name__ == "__main__":
    main()

"""Framework overhead of ``model.encode`` against a hand-written plain forward of the same modules.

Both sides get the same PIL images and strings, the same batch size, dtype and thread count; the
plain side does by hand what a user would write without mmembed (transform, tokenize, splice,
forward, last token, normalize). Runs alternate and the median of each is reported; the ratio
plain/encode should stay >= 0.95 on a model big enough that compute dominates.

    python tools/bench_encode.py                      # a ViT-S/16 + 8-layer 512-wide Qwen2, random init
    python tools/bench_encode.py --recipe recipes/tiny/composed.yaml --n 64

Native VLM recipes (``qwen2_vl``, ``llava`` backbones) compare ``model.encode`` with a plain transformers forward
(the HF processor + ``Model.model(**inputs)``, last token, normalize) of the same model and batch, and with
``--merge R`` also ``model.encode`` with token merging (keep ratio R per image); ``--reduce SPEC`` times any
reduction (``'{merge: {type: aim, keep_ratio: 0.25}, prune: {type: aim}}'``: AIM merging before the LLM and
pruning inside it; the format-1 form ``'{type: aim, keep_ratio: 0.25}'`` is read too). ``--random-init``
builds the recipe's architecture from a built-in copy of its HF config (no download) with the offline processor:

    python tools/bench_encode.py --recipe recipes/vlm2vec/qwen2vl_2b.yaml --random-init --merge 0.25 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from native_presets import native_overrides  # tools/ is on sys.path when run as a script
from PIL import Image

import mmembed

MID_OVERRIDES = [
    "model.vision={type: timm, name: vit_small_patch16_224, pretrained: false}",
    "model.backbone.config.hidden_size=512",
    "model.backbone.config.intermediate_size=1536",
    "model.backbone.config.num_hidden_layers=8",
    "model.backbone.config.num_attention_heads=8",
    "model.backbone.config.num_key_value_heads=4",
    "model.max_length=256",
]


def plain_native(model, texts, images, instruction: str) -> torch.Tensor:
    """A plain transformers forward: HF processor on hand-written strings, ``Model.model``, last token, normalize."""
    bb = model.backbone
    tok = bb.tokenizer
    side = model.processor.padding_side
    strings = [f"{bb.image_text}{instruction} {t}{tok.eos_token}" for t in texts]
    inputs = bb.hf_processor(text=strings, images=list(images), padding=True, padding_side=side, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(bb.model.parameters()).dtype)
    hidden = bb.model(**inputs, use_cache=False).last_hidden_state
    mask = inputs["attention_mask"]
    last = torch.full_like(mask[:, 0], mask.shape[1] - 1) if side == "left" else mask.sum(1) - 1
    return F.normalize(hidden[torch.arange(len(texts), device=hidden.device), last].float(), dim=-1).cpu()


def plain_forward(model, texts, images, instruction: str) -> torch.Tensor:
    """What a user would write by hand for one batch with the same modules (no mmembed helpers)."""
    tok = model.backbone.tokenizer
    n_img = model.processor.image_tokens
    ph = model.processor.placeholder_id
    pixels = torch.stack([model.vision.transform(img) for img in images])
    body = tok([f"{instruction} {t}" for t in texts], add_special_tokens=False)["input_ids"]
    rows = [[ph] * n_img + b + [tok.eos_token_id] for b in body]  # VLM2Vec layout: image, instruction, text
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    vis = model.vision.model.forward_features(pixels)[:, model.vision.num_prefix :]
    feats = model.connector.proj(vis)
    emb = model.backbone.model.get_input_embeddings()(ids)
    emb = emb.masked_scatter((ids == ph).unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    hidden = model.backbone.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False)
    return F.normalize(hidden.last_hidden_state[:, -1], dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny/composed.yaml")
    ap.add_argument("--tiny", action="store_true", help="use the recipe as is (default: mid-size overrides)")
    ap.add_argument("--n", type=int, default=32, help="rows per run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--random-init", action="store_true", help="native VLM recipes: built-in architecture, no download")
    ap.add_argument("--merge", type=float, default=0.0, help="also time token merging at this keep ratio")
    ap.add_argument(
        "--reduce",
        action="append",
        default=[],
        help="also time this reduction, a YAML mapping (repeatable), e.g. '{merge: {type: aim}, prune: {type: aim}}'",
    )
    ap.add_argument("--dtype", help="native VLM recipes: override model.backbone.dtype (float32 / bfloat16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, default=448, help="native VLM recipes: input image side in pixels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from omegaconf import OmegaConf

    from mmembed.config import load_recipe, upgrade_model_dict
    from mmembed.registry import BACKBONES

    native = BACKBONES.get(load_recipe(args.recipe).model.backbone["type"]).processor == "hf"  # HF-processor VLM
    if native:
        overrides = native_overrides(args.recipe, args.random_init, args.dtype)
    else:
        overrides = [] if args.tiny else MID_OVERRIDES
    model = mmembed.build_model(args.recipe, overrides).eval().to(args.device)
    size = args.image_size if native else model.vision.image_size
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size + 17, size + 5, 3), dtype=np.uint8)) for _ in range(args.n)]
    texts = [f"a photo of object number {i} in a scene with several things" for i in range(args.n)]
    instruction = "Represent the given image with the following question:"
    bs = args.batch_size
    plain_fn = plain_native if native else plain_forward

    def run_plain() -> np.ndarray:
        with torch.inference_mode():
            starts = range(0, args.n, bs)
            outs = [plain_fn(model, texts[s : s + bs], images[s : s + bs], instruction) for s in starts]
        return torch.cat(outs).numpy()

    def run_encode() -> np.ndarray:
        return model.encode(texts=texts, images=images, instruction=instruction, batch_size=bs, show_progress_bar=False)

    runs = {"plain": run_plain, "encode": run_encode}
    specs = ([f"{{merge: {{type: aim, keep_ratio: {args.merge}}}}}"] if args.merge else []) + args.reduce
    if specs and (model.merge is not None or model.prune is not None):
        raise SystemExit("--merge/--reduce compare against a model without token reduction; drop model.merge/prune")
    for text in specs:
        spec = OmegaConf.to_container(OmegaConf.create(text))
        if "type" in spec:  # a format-1 reducer mapping
            spec = upgrade_model_dict({"reducer": spec})
        slots = [f"model.{k}={json.dumps(v)}" for k, v in spec.items() if k in ("merge", "prune")]
        reduced = mmembed.build_model(args.recipe, overrides + slots).eval().to(args.device)
        reduced.load_state_dict(model.state_dict())  # mergers and pruners have no weights
        name = "encode + " + ", ".join(f"{k}={v}" for k, v in spec.items())

        def run_reduced(m: torch.nn.Module = reduced) -> np.ndarray:
            return m.encode(texts=texts, images=images, instruction=instruction, batch_size=bs, show_progress_bar=False)

        runs[name] = run_reduced
        runs[name]()  # warm-up
    diff = np.abs(run_plain() - run_encode()).max()  # also warms up both paths
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    dtype = next(model.parameters()).dtype
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"model {params:.1f}M params, {model.processor.image_tokens} visual tokens/image (max), {args.n} rows, "
        f"batch {bs}, {args.threads} threads, {dtype}, {device}"
    )
    print(f"max |plain - encode| = {diff:.2e}")
    print(f"plain forward : {args.n / med['plain']:8.2f} rows/s (median of {args.repeats})")
    print(f"model.encode  : {args.n / med['encode']:8.2f} rows/s")
    for name in list(med)[2:]:
        print(f"{name:14s}: {args.n / med[name]:8.2f} rows/s  ({med['encode'] / med[name]:.2f}x encode)")
    print(f"overhead ratio (plain time / encode time) = {med['plain'] / med['encode']:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()

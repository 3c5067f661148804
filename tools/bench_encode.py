"""Framework overhead of ``model.encode`` against a hand-written plain forward of the same modules.

Both sides get the same PIL images and strings, the same batch size, dtype and thread count; the
plain side does by hand what a user would write without mmembed (transform, tokenize, splice,
forward, last token, normalize). Runs alternate and the median of each is reported; the ratio
plain/encode should stay >= 0.95 on a model big enough that compute dominates.

    python tools/bench_encode.py                      # a ViT-S/16 + 8-layer 512-wide Qwen2, random init
    python tools/bench_encode.py --recipe recipes/tiny/composed.yaml --n 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
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


def plain_forward(model, texts, images, instruction: str) -> torch.Tensor:
    """What a user would write by hand for one batch with the same modules (no mmembed helpers)."""
    tok = model.backbone.tokenizer
    n_img = model.processor.image_tokens
    ph = model.processor.placeholder_id
    pixels = torch.stack([model.vision.transform(img) for img in images])
    prefix = tok([instruction + " "] * len(texts), add_special_tokens=False)["input_ids"]
    body = tok(list(texts), add_special_tokens=False)["input_ids"]
    rows = [p + [ph] * n_img + b + [tok.eos_token_id] for p, b in zip(prefix, body)]
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mmembed.build_model(args.recipe, [] if args.tiny else MID_OVERRIDES).eval()
    size = model.vision.image_size
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size + 17, size + 5, 3), dtype=np.uint8)) for _ in range(args.n)]
    texts = [f"a photo of object number {i} in a scene with several things" for i in range(args.n)]
    instruction = "Represent the given image with the following question:"
    bs = args.batch_size

    def run_plain() -> np.ndarray:
        with torch.inference_mode():
            starts = range(0, args.n, bs)
            outs = [plain_forward(model, texts[s : s + bs], images[s : s + bs], instruction) for s in starts]
        return torch.cat(outs).numpy()

    def run_encode() -> np.ndarray:
        return model.encode(texts=texts, images=images, instruction=instruction, batch_size=bs, show_progress_bar=False)

    diff = np.abs(run_plain() - run_encode()).max()  # also warms up both paths
    times: dict[str, list[float]] = {"plain": [], "encode": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", run_plain), ("encode", run_encode)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    plain, enc = statistics.median(times["plain"]), statistics.median(times["encode"])
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model {params:.1f}M params, {model.processor.image_tokens} visual tokens/image, {args.n} rows, "
        f"batch {bs}, {args.threads} threads, fp32 CPU"
    )
    print(f"max |plain - encode| = {diff:.2e}")
    print(f"plain forward : {args.n / plain:8.2f} rows/s (median of {args.repeats})")
    print(f"model.encode  : {args.n / enc:8.2f} rows/s")
    print(f"overhead ratio (plain time / encode time) = {plain / enc:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()

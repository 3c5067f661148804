"""Side by side with VLM2Vec's own code: token ids, positions, embeddings, loss and scores on one checkpoint.

VLM2Vec's packaged code (PyPI ``vlm2vec-for-pyserini`` 0.2.0, a fork of TIGER-Lab/VLM2Vec) needs transformers
4.51.3, so it runs in a venv of its own (``--venv``; built here from the package registry, or from ``--wheels DIR``
offline). Its side (tools/parity/_peer_vlm2vec.py) builds a tiny random model with VLM2Vec's bundled class
(Qwen2-VL, LLaVA-Next), saves it with its processor and embeds fixed rows (image, image+text, text) as VLM2Vec's eval
does. mmembed then loads the same directory as ``model.layout: mmembed`` with transformers' default image processor
("before"), as ``model.layout: vlm2vec`` with the torchvision one and with the PIL one ("after"), embeds the same
rows, and prints them side by side.

    python tools/parity/vlm2vec.py                       # build /tmp/vlm2vec-peer if missing, compare
    python tools/parity/vlm2vec.py --write-fixtures tests/fixtures/vlm2vec_parity   # one folder per family

``--write-fixtures`` keeps the checkpoint, images, rows and VLM2Vec's outputs for the fast test
(tests/test_vlm2vec_parity.py), which needs no peer venv. Exit status 1 when "after" is not exact (token ids
identical, embeddings within 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mmembed.backbones.native import TINY_TEXT_CONFIG
from mmembed.backbones.qwen2_vl import TINY_QWEN2VL_CONFIG
from mmembed.tiny import TINY_CLIP_VISION_CONFIG

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEER_PIP = [  # what VLM2Vec's model and processor modules import, nothing it only needs for training or video
    ["torch==2.14.1", "torchvision==0.29.1"],
    ["--no-deps", "transformers==4.51.3", "tokenizers==0.21.1"],
    ["huggingface_hub<1.0", "safetensors", "regex", "pyyaml", "requests", "tqdm", "packaging", "filelock", "pillow"],
    [
        "numpy",
        "peft==0.15.2",
        "accelerate",
        "einops",
        "scikit-learn",
        "scikit-image",
        "opencv-python-headless",
        "timm",
        "pytrec-eval-terrier",
    ],
    ["--no-deps", "--ignore-requires-python", "vlm2vec-for-pyserini==0.2.0"],  # declares python>=3.12, torch 2.9.1
]
#: flash_attn is imported at module level by baselines VLM2Vec's processor module pulls in (InternVideo2, Phi-3-V);
#: none of it runs here, so a stub that raises if called stands in (transformers sees no flash-attn installed).
SHIM = {
    "flash_attn/__init__.py": "def flash_attn_func(*a, **k):\n    raise RuntimeError('flash_attn stub')\n\n"
    "flash_attn_varlen_func = flash_attn_func\n",
    "flash_attn/flash_attn_interface.py": "from flash_attn import flash_attn_func as "
    "flash_attn_varlen_qkvpacked_func\n",
    "flash_attn/bert_padding.py": "from flash_attn import flash_attn_func as unpad_input\n"
    "pad_input = index_first_axis = unpad_input\n",
    "flash_attn/modules/__init__.py": "",
    "flash_attn/modules/mlp.py": "FusedMLP = None\n",
    "flash_attn/ops/__init__.py": "",
    "flash_attn/ops/rms_norm.py": "DropoutAddRMSNorm = None\n",
    "flash_attn/layers/__init__.py": "",
    "flash_attn/layers/rotary.py": "from flash_attn import flash_attn_func as apply_rotary_emb\n",
}
#: transformers 4.51 config of mmembed's tiny Qwen2-VL (4.51 keeps the text settings and rope at the top level)
PEER_CONFIG: dict[str, Any] = {
    **TINY_TEXT_CONFIG,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    **{k: TINY_QWEN2VL_CONFIG[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id")},
    "video_token_id": TINY_QWEN2VL_CONFIG["video_token_id"],
    "vision_config": TINY_QWEN2VL_CONFIG["vision_config"],
}
ROWS = [  # MMEB-style rows: classification query, VQA query, text candidates, a second image
    {"instruction": "Represent the given image for classification", "text": None, "image": "img0.png"},
    {
        "instruction": "Represent the given image with the following question:",
        "text": "what is red",
        "image": "img1.png",
    },
    {"instruction": "", "text": "a red square", "image": None},
    {"instruction": "Represent the given text", "text": "a blue circle", "image": None},
    {"instruction": "Represent the given image", "text": None, "image": "img2.png"},
]
QUERIES, TARGETS = [0, 1], [2, 3]
_CLIP = TINY_CLIP_VISION_CONFIG
_TEXT = {**TINY_TEXT_CONFIG, "rope_theta": 10000.0}
#: per backbone family: VLM2Vec's backbone name, the tiny config in transformers 4.51's form, mmembed's tiny recipe
#: (its other settings, e.g. the padding side VLM2Vec uses), image sizes and the tokens the tokenizer adds
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2vl": {
        "family": "qwen2_vl",
        "config": PEER_CONFIG,
        "recipe": "recipes/tiny/qwen2vl.yaml",
        "image_sizes": [(56, 56), (84, 56), (70, 98)],
        "added_tokens": ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
        "special_tokens": {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "bos_token": None},
        "padding_side": "left",
        "min_pixels": 28 * 28 * 4,
        "max_pixels": 28 * 28 * 16,
    },
    "llava_next": {
        "family": "llava_next",
        "config": {
            "model_type": "llava_next",
            "image_token_index": 400,
            "vision_feature_select_strategy": "default",
            "vision_feature_layer": -2,
            "image_seq_length": 16,
            "vision_config": _CLIP,
            "text_config": {"model_type": "qwen2", **_TEXT},
            "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
        },
        "recipe": "recipes/tiny/llava.yaml",
        # VLM2Vec stacks the pixel arrays of a batch, so its images must tile alike (same size here)
        "image_sizes": [(64, 64), (64, 64), (64, 64)],
        "added_tokens": ["<image>"],
        "special_tokens": {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>"},
        "padding_side": "right",
        "image_size": 32,
        "min_pixels": None,
        "max_pixels": None,
    },
}
SPEC = {"seed": 0, "temperature": 0.02}


def ensure_venv(venv: Path, wheels: Path | None) -> Path:
    """The peer's python, building the venv first when it does not exist."""
    py = venv / "bin" / "python"
    if py.exists():
        return py
    print(f"building the peer venv at {venv} (transformers 4.51.3, vlm2vec-for-pyserini 0.2.0)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    offline = ["--no-index", "--find-links", str(wheels)] if wheels else []
    for group in PEER_PIP:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *offline, *group], check=True)
    return py


def prepare(work: Path, fam: dict[str, Any]) -> None:
    """The rows, images, tokenizer and spec both sides read."""
    from PIL import Image

    from mmembed.tiny import build_tiny_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    for path, text in SHIM.items():
        (work / "shim" / path).parent.mkdir(parents=True, exist_ok=True)
        (work / "shim" / path).write_text(text)
    rng = np.random.RandomState(0)
    for i, (w, h) in enumerate(fam["image_sizes"]):
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(work / f"img{i}.png")
    tok = build_tiny_tokenizer()
    tok.add_tokens(fam["added_tokens"], special_tokens=True)
    tok.backend_tokenizer.save(str(work / "tokenizer.json"))
    spec = {**SPEC, **{k: v for k, v in fam.items() if k not in ("recipe", "image_sizes")}, "rows": ROWS}
    np.save(work / "metric_scores.npy", metric_scores())
    (work / "spec.json").write_text(json.dumps({**spec, "queries": QUERIES, "targets": TARGETS}, indent=1))


def metric_scores(n: int = 500, m: int = 10, seed: int = 0) -> np.ndarray:
    """(n, m) scores with many exact ties (one decimal), a copy of the positive's score in about a third of the rows:
    the case where the official (positive first wins) and tie-aware definitions part."""
    rng = np.random.RandomState(seed)
    s = np.round(rng.rand(n, m), 1)
    dup = rng.rand(n) < 0.33
    s[dup, int(m / 2)] = s[dup, 0]
    return s


def compare_metrics(work: Path) -> dict[str, tuple[float, float, float]]:
    """VLM2Vec's official metrics (its RankingMetrics on a stable sort, and on numpy's default sort as its eval.py
    calls it), mmembed's official ones, and mmembed's tie-aware hit@1, on :func:`metric_scores`."""
    from mmembed.eval.metrics import hit_at_k, official_metrics

    scores = np.load(work / "metric_scores.npy")
    peer = json.loads((work / "peer_metrics.json").read_text())
    ours = [official_metrics(row, 0) for row in scores]
    out = {}
    for theirs, key in (
        ("hit@1", "hit@1"),
        ("hit@5", "hit@5"),
        ("recall@5", "recall@5"),
        ("mrr@10", "mrr@10"),
        ("ndcg_linear@5", "ndcg@5"),
    ):
        mine = float(np.mean([o[f"official_{key}"] for o in ours]))
        out[f"official {key}"] = (peer["stable"][theirs], peer["default"][theirs], mine)
    nan = float("nan")
    out["tie-aware hit@1 (mmembed only)"] = (nan, nan, float(np.mean([hit_at_k(r, 0, 1) for r in scores])))
    return out


def run_peer(py: Path, work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(work / "shim"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([str(py), str(HERE / "_peer_vlm2vec.py"), str(work)], check=True, env=env, cwd=work)


def mmembed_side(
    checkpoint: Path, images: Path, layout: str, backend: str | None, recipe: str = FAMILIES["qwen2vl"]["recipe"]
) -> dict[str, np.ndarray]:
    """mmembed's token ids, positions, embeddings, loss and scores of :data:`ROWS` on ``checkpoint``."""
    import torch

    from mmembed.build import build_model
    from mmembed.losses import InfoNCELoss
    from mmembed.types import Side

    overrides = [f"model.backbone.name={checkpoint}", f"model.layout={layout}", "model.backbone.config=null"]
    if backend:
        overrides.append(f"model.backbone.image_backend={backend}")
    model = build_model(str(REPO / recipe), overrides).eval()
    sides = [
        Side(text=r["text"], images=[str(images / r["image"])] if r["image"] else [], instruction=r["instruction"])
        for r in ROWS
    ]
    seen: list[torch.Tensor] = []
    lm = model.backbone.language_model()
    lm.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    with torch.no_grad():
        batch = model.processor(sides)
        emb = model(batch)
    pos = seen[-1]
    if pos is None:  # the LLM numbers positions itself: 0..L-1 over the padded row
        pos = torch.arange(batch["attention_mask"].shape[1]).expand(batch["attention_mask"].shape[0], -1)
    pos = pos if pos.ndim == 3 else pos.unsqueeze(0).expand(3, -1, -1)
    q, t = emb[QUERIES], emb[TARGETS]
    loss_fn = InfoNCELoss(temperature=SPEC["temperature"], mask_same_targets=False, gather=False)
    loss = loss_fn(q, t)
    grad_emb = model(batch)  # with grad: the loss's gradient on the last layer's output projection
    loss_fn(grad_emb[QUERIES], grad_emb[TARGETS]).backward()
    grad = lm.layers[-1].self_attn.o_proj.weight.grad.numpy()
    return {
        "grad_o_proj": grad,
        "input_ids": batch["input_ids"].numpy(),
        "attention_mask": batch["attention_mask"].numpy(),
        "positions": pos.numpy(),
        "emb": emb.numpy(),
        "loss": np.array(float(loss)),
        "scores": (q @ t.T).numpy(),
    }


def real(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Per row, the values at real (unpadded) tokens: padding side and length do not matter."""
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]


def compare(peer: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> dict[str, Any]:
    ids_p, ids_o = real(peer["input_ids"], peer["attention_mask"]), real(ours["input_ids"], ours["attention_mask"])
    pos_p = [real(peer["positions_first"][a], peer["attention_mask"]) for a in range(3)]
    pos_o = [real(ours["positions"][a], ours["attention_mask"]) for a in range(3)]
    # positions only mean the same within a row up to a shift (RoPE is relative): compare from the row's first token
    shift = lambda rows: [[x - r[0] for x in r] if r else r for r in rows]  # noqa: E731
    e_p, e_o = peer["emb_first"], ours["emb"]
    cos = (e_p * e_o).sum(-1) / (np.linalg.norm(e_p, axis=-1) * np.linalg.norm(e_o, axis=-1))
    return {
        "token ids identical": ids_p == ids_o,
        "rows with other ids": sum(a != b for a, b in zip(ids_p, ids_o)),
        "positions identical": all(shift(a) == shift(b) for a, b in zip(pos_p, pos_o)) and ids_p == ids_o,
        "embedding max |diff|": float(np.abs(e_p - e_o).max()),
        "embedding min cosine": float(cos.min()),
        "loss |diff|": abs(float(peer["loss"]) - float(ours["loss"])),
        "grad rel. max |diff|": float(
            np.abs(peer["grad_o_proj"] - ours["grad_o_proj"]).max() / max(np.abs(peer["grad_o_proj"]).max(), 1e-30)
        ),
        "scores max |diff|": float(np.abs(peer["scores"] - ours["scores"]).max()),
        "hit@1 equal": bool((peer["scores"].argmax(1) == ours["scores"].argmax(1)).all()),
    }


def fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/vlm2vec-peer"), help="peer venv (built if missing)")
    ap.add_argument("--wheels", type=Path, default=None, help="install the peer venv from this wheel folder, offline")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlm2vec-parity"), help="scratch folder (overwritten)")
    ap.add_argument("--write-fixtures", type=Path, default=None, help="keep checkpoint, rows and outputs here")
    ap.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args(argv)

    py = ensure_venv(args.venv, args.wheels)
    ok = True
    for name in args.family:
        ok &= run_family(name, py, args.work / name, args.write_fixtures / name if args.write_fixtures else None)
    metrics = compare_metrics(args.work / args.family[0])
    print("\nscores: 500 queries x 10 candidates, exact ties, a copy of the positive in a third of the rows")
    print("| metric | VLM2Vec, stable sort | VLM2Vec, numpy default sort (as eval.py) | mmembed |\n|---|---|---|---|")
    for key, (stable, default, mine) in metrics.items():
        print(f"| {key} | {stable:.4f} | {default:.4f} | {mine:.4f} |")
    ok &= all(abs(a - c) <= 1e-12 for a, _, c in metrics.values() if a == a)
    print("PARITY OK" if ok else "PARITY FAILED: see the tables")
    return 0 if ok else 1


def run_family(name: str, py: Path, work: Path, fixtures: Path | None) -> bool:
    """Both sides on one family's tiny checkpoint; print the table; whether "after" is exact."""
    fam = FAMILIES[name]
    if work.exists():
        shutil.rmtree(work)
    prepare(work, fam)
    run_peer(py, work)
    peer = dict(np.load(work / "peer.npz"))
    ckpt = work / "checkpoint"
    runs = [
        ("before: layout mmembed, torchvision", "mmembed", None),
        ("layout vlm2vec, torchvision", "vlm2vec", "torchvision"),
        ("after: layout vlm2vec, pil", "vlm2vec", "pil"),
    ]
    table = [compare(peer, mmembed_side(ckpt, work, layout, backend, fam["recipe"])) for _, layout, backend in runs]
    second = float(np.abs(peer["emb_first"] - peer["emb_second"]).max())
    print(
        f"\n{name} (tiny, random, fp32, CPU), 5 rows: 2 image, 1 image+text, 2 text; "
        "VLM2Vec = vlm2vec-for-pyserini 0.2.0"
    )
    print(f"| {'':26} | " + " | ".join(f"{c:35}" for c, _, _ in runs) + " |")
    print(f"|{'-' * 28}|" + "|".join("-" * 37 for _ in runs) + "|")
    for key in table[0]:
        print(f"| {key:26} | " + " | ".join(f"{fmt(t[key]):35}" for t in table) + " |")
    print(f"VLM2Vec's own first vs second call (cached rope_deltas): max |diff| {second:.3g}")
    after = table[-1]
    ok = after["token ids identical"] and after["positions identical"] and after["embedding max |diff|"] <= 1e-5
    ok = ok and after["grad rel. max |diff|"] <= 1e-4
    if fixtures:
        fixtures.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ckpt, fixtures / "checkpoint", dirs_exist_ok=True)
        for f in (fixtures / "checkpoint").iterdir():
            f.chmod(0o644)
        for i in range(len(fam["image_sizes"])):
            shutil.copy(work / f"img{i}.png", fixtures / f"img{i}.png")
        keep = ("input_ids", "attention_mask", "positions_first", "emb_first", "loss", "scores", "grad_o_proj")
        np.savez(fixtures / "vlm2vec.npz", **{k: peer[k] for k in keep})
        meta = {
            "rows": ROWS,
            "queries": QUERIES,
            "targets": TARGETS,
            "temperature": SPEC["temperature"],
            "recipe": fam["recipe"],
            "written_by": "tools/parity/vlm2vec.py --write-fixtures",
            "peer": "vlm2vec-for-pyserini 0.2.0, transformers 4.51.3",
        }
        (fixtures / "rows.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"fixtures written to {fixtures}")
    return ok


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())

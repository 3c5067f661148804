"""Does an ``mmembed export --to hf`` folder embed in vLLM's pooling runner as mmembed does?

    python tools/vllm_check.py EXPORT_DIR [--model-dir MODEL_DIR] [--dtype float32] [--tol 1e-4] [--json OUT.json]

Runs in an environment that has vLLM (docs/export.md, "vLLM"): a fixed set of rows (texts, the saved prompts; images
too when the export is a VLM) goes through ``vllm.LLM(EXPORT_DIR, runner="pooling").embed(prompts)`` and through a
reference, and the script prints the max abs diff and cosine per row; exit 1 when a row is above ``--tol`` (or
under ``--min-cos``), 3 when ``import vllm`` fails, 2 for a bad folder.

The reference is mmembed's own ``encode`` when ``--model-dir`` is given and mmembed imports here; otherwise
transformers' ``AutoModel`` on the export, pooled as its ``modules.json`` says (last real token, the ``Dense``
weights, ``Normalize``): what sentence-transformers computes, which tests/export/ checks against mmembed's encode.
``--json`` also writes the vLLM vectors, so an mmembed environment can compare them with ``encode``
(tests/export/test_vllm.py does).

vLLM API used (checked in vllm 0.32.0's source, ``vllm/entrypoints/llm.py`` and ``vllm/entrypoints/pooling/
offline.py``; docs: https://docs.vllm.ai/en/latest/models/pooling_models.html): ``LLM(model=..., runner="pooling",
dtype=..., enforce_eager=True, gpu_memory_utilization=..., max_model_len=..., limit_mm_per_prompt=...)``;
``LLM.embed(prompts, use_tqdm=False)`` -> ``EmbeddingRequestOutput`` with ``.outputs.embedding`` and
``.prompt_token_ids``; a prompt is a string or a ``TextPrompt`` ``{"prompt": str, "multi_modal_data": {"image": [PIL,
...]}}`` (``vllm/inputs/llm.py``), tokenized with ``add_special_tokens=True`` (``vllm/renderers/params.py``). The
pooling config comes from the folder's ``modules.json`` / ``1_Pooling/config.json`` / ``Normalize`` / ``Dense``
(``vllm/transformers_utils/config.py``: ``get_pooling_config``, ``try_get_dense_modules``). VLM rows are rendered
with the folder's ``chat_template.jinja`` by the HF processor (``apply_chat_template(..., tokenize=False)``), the
message form sentence-transformers builds (system = the prompt, user = images then text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

#: default tolerances on the max abs diff of one row's (normalized) embedding, and the least cosine
TOLERANCES = {"float32": (1e-4, 0.9999), "bfloat16": (5e-2, 0.99), "float16": (3e-2, 0.995)}

TEXTS = ("a red circle on the left", "what color is the object?", "  x  y ", "a small green triangle in the center")


def make_image(i: int, size: tuple[int, int] | None = None) -> Any:
    """A deterministic picture: a coloured background with one shape (no files, no randomness)."""
    from PIL import Image, ImageDraw

    size = size or (48 + 8 * i, 56 - 4 * i)
    colors = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (220, 200, 40)]
    img = Image.new("RGB", size, colors[i % 4])
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    fill = colors[(i + 2) % 4]
    if i % 2 == 0:
        draw.ellipse(box, fill=fill)
    else:
        draw.rectangle(box, fill=fill)
    return img


def read_export(path: Path) -> dict[str, Any]:
    """What the check needs from an export folder: VLM or text, prompts, the modules."""
    modules = json.loads((path / "modules.json").read_text())
    config = json.loads((path / "config.json").read_text())
    st = json.loads((path / "config_sentence_transformers.json").read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if types[0] != "Transformer":
        raise SystemExit(f"{path}: modules.json starts with {types[0]}, not a --to hf export (composed module?)")
    return {
        "vlm": (path / "chat_template.jinja").is_file(),
        "architectures": config.get("architectures"),
        "prompts": dict(st.get("prompts") or {}),
        "dense": next((path / m["path"] for m in modules if m["type"].endswith("Dense")), None),
        "normalize": "Normalize" in types,
        "pooling": json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode"],
    }


def rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The fixed rows: ``name``, ``text`` (or None), ``prompt`` (a saved prompt's name or None), ``image`` (an index
    for :func:`make_image` or None)."""
    out = [{"name": f"text {i}", "text": t, "prompt": None, "image": None} for i, t in enumerate(TEXTS)]
    for name, value in info["prompts"].items():
        if value:
            out.append({"name": f"{name} text", "text": TEXTS[0], "prompt": name, "image": None})
    if info["vlm"]:
        out.append({"name": "image", "text": None, "prompt": None, "image": 0})
        out.append({"name": "image+text", "text": TEXTS[1], "prompt": None, "image": 1})
        for name, value in info["prompts"].items():
            if value:
                out.append({"name": f"{name} image+text", "text": TEXTS[3], "prompt": name, "image": 2})
    return out


def messages(row: dict[str, Any], prompts: dict[str, str]) -> list[dict[str, Any]]:
    """sentence-transformers' message form of a VLM row (``InputFormatter``): system prompt, user images + text."""
    content: list[dict[str, Any]] = []
    if row["image"] is not None:
        content.append({"type": "image", "image": make_image(row["image"])})
    if row["text"] is not None:
        content.append({"type": "text", "text": row["text"]})
    out = [{"role": "user", "content": content}]
    if row["prompt"]:
        out.insert(0, {"role": "system", "content": [{"type": "text", "text": prompts[row["prompt"]]}]})
    return out


def vllm_prompts(path: Path, info: dict[str, Any], rs: list[dict[str, Any]]) -> list[Any]:
    """One vLLM prompt per row: ``prompt + text`` (text exports), the rendered chat template + images (VLMs)."""
    if not info["vlm"]:
        return [(info["prompts"][r["prompt"]] if r["prompt"] else "") + r["text"] for r in rs]
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    out = []
    for r in rs:
        text = proc.apply_chat_template(messages(r, info["prompts"]), tokenize=False)
        prompt: dict[str, Any] = {"prompt": text}
        if r["image"] is not None:
            prompt["multi_modal_data"] = {"image": [make_image(r["image"])]}
        out.append(prompt)
    return out


def reference_hf(path: Path, info: dict[str, Any], rs: list[dict[str, Any]], device: str) -> tuple[list, list]:
    """transformers' ``AutoModel`` on the export, one unpadded row at a time: last token -> Dense -> Normalize."""
    import torch
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    if info["pooling"] != "lasttoken":
        raise SystemExit(f"pooling_mode={info['pooling']}: this check knows lasttoken only")
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    dense = None
    if info["dense"] is not None:
        from safetensors.torch import load_file

        cfg = json.loads((info["dense"] / "config.json").read_text())
        if not cfg["activation_function"].endswith("Identity") or cfg.get("bias"):
            raise SystemExit(f"{info['dense']}: only a bias-free identity Dense is known here")
        dense = load_file(str(info["dense"] / "model.safetensors"))["linear.weight"].to(device)
    proc = AutoProcessor.from_pretrained(path) if info["vlm"] else AutoTokenizer.from_pretrained(path)
    texts = vllm_prompts(path, info, rs) if not info["vlm"] else [None] * len(rs)
    vecs, ids = [], []
    for r, prompt in zip(rs, texts):
        if info["vlm"]:
            batch = proc.apply_chat_template(
                [messages(r, info["prompts"])], tokenize=True, return_dict=True, return_tensors="pt"
            )
        else:
            batch = proc([prompt], return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            h = model(**batch).last_hidden_state[0, -1].float()
        if dense is not None:
            h = dense.float() @ h
        if info["normalize"]:
            h = torch.nn.functional.normalize(h, dim=-1)
        vecs.append(h.cpu().tolist())
        ids.append(batch["input_ids"][0].tolist())
    del model
    return vecs, ids


def reference_mmembed(model_dir: Path, rs: list[dict[str, Any]]) -> list:
    """mmembed's ``encode`` of the rows (fp32, CPU); the prompt by its saved name."""
    import mmembed

    model = mmembed.load(model_dir, dtype="float32")
    out = []
    for r in rs:
        images = [make_image(r["image"])] if r["image"] is not None else None
        texts = [r["text"]] if r["text"] is not None else None
        out.append(model.encode(texts=texts, images=images, prompt_name=r["prompt"])[0].tolist())
    return out


def run_vllm(path: Path, info: dict[str, Any], rs: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list, list]:
    """``LLM(path, runner="pooling").embed(prompts)``: the vectors and the token ids vLLM ran."""
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": str(path),
        "runner": "pooling",
        "dtype": args.dtype,
        "enforce_eager": True,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "seed": 0,
    }
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    if info["vlm"]:
        kwargs["limit_mm_per_prompt"] = {"image": 1}
    llm = LLM(**kwargs)
    outs = llm.embed(vllm_prompts(path, info, rs), use_tqdm=False)
    return [list(o.outputs.embedding) for o in outs], [list(o.prompt_token_ids) for o in outs]


def compare(a: list, b: list) -> tuple[float, float]:
    """(max abs diff, cosine) of two vectors."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        return float("inf"), float("nan")
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30))
    return float(np.abs(x - y).max()), cos


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", type=Path, help="an `mmembed export --to hf` folder")
    p.add_argument("--model-dir", type=Path, help="the mmembed model directory: reference = mmembed's encode")
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCES), help="vLLM's dtype (default float32)")
    p.add_argument("--tol", type=float, help="max abs diff per row (default: 1e-4 fp32, 5e-2 bf16, 3e-2 fp16)")
    p.add_argument("--min-cos", type=float, help="least cosine per row (default: 0.9999 fp32, 0.99 bf16)")
    p.add_argument("--max-model-len", type=int, help="vLLM's max_model_len (default: what it derives from the folder)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    p.add_argument("--ref-device", default=None, help="device of the transformers reference (default cuda if any)")
    p.add_argument("--json", type=Path, help="write the figures (and the vectors) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.export_dir.resolve()
    if not (path / "modules.json").is_file():
        print(f"{path}: no modules.json (not an export folder)", file=sys.stderr)
        return 2
    try:
        import vllm
    except Exception as e:  # noqa: BLE001 - any failure to import is "no usable vLLM here"
        print(
            f"vllm_check: `import vllm` failed ({type(e).__name__}: {e}); install vLLM (docs/export.md)",
            file=sys.stderr,
        )
        return 3
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for the CPU backend
    tol, min_cos = TOLERANCES[args.dtype]
    tol = args.tol if args.tol is not None else tol
    min_cos = args.min_cos if args.min_cos is not None else min_cos
    info = read_export(path)
    rs = rows(info)
    device = args.ref_device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_vecs, hf_ids = reference_hf(path, info, rs, device)
    ref_vecs, ref_name = hf_vecs, "transformers"
    if args.model_dir is not None:
        try:
            ref_vecs, ref_name = reference_mmembed(args.model_dir, rs), "mmembed"
        except ImportError as e:
            print(f"mmembed not importable here ({e}); reference = transformers on the export", file=sys.stderr)
    vecs, ids = run_vllm(path, info, rs, args)
    results, ok = [], True
    print(f"vLLM {vllm.__version__} ({args.dtype}) vs {ref_name}; tol {tol:g}, min cos {min_cos}")
    print(f"{'row':<26}{'max abs diff':>14}{'cosine':>12}{'vs HF':>12}  ids == HF")
    for r, v, ref, i, hi, hv in zip(rs, vecs, ref_vecs, ids, hf_ids, hf_vecs):
        diff, cos = compare(v, ref)
        hf_diff = compare(v, hv)[0]
        bad = not (diff <= tol and cos >= min_cos)
        ok &= not bad
        print(f"{r['name']:<26}{diff:>14.3e}{cos:>12.8f}{hf_diff:>12.3e}  {i == hi}{'  FAIL' if bad else ''}")
        results.append(
            {**r, "max_abs_diff": diff, "cosine": cos, "max_abs_diff_hf": hf_diff, "ids_equal": i == hi, "vllm": v}
            | {"ref": ref}
        )
    worst = max(x["max_abs_diff"] for x in results)
    print(f"max abs diff over {len(results)} rows: {worst:.3e} -> {'ok' if ok else 'FAIL'}")
    if args.json:
        summary = {"vllm": vllm.__version__, "torch": torch.__version__, "dtype": args.dtype, "reference": ref_name}
        summary |= {"device": "cuda" if torch.cuda.is_available() else "cpu", "tol": tol, "min_cos": min_cos}
        summary |= {"architectures": info["architectures"], "max_abs_diff": worst, "ok": ok, "rows": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":  # vLLM's engine starts worker processes: the guard is needed (spawn)
    raise SystemExit(main())

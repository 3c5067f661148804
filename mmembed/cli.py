"""The ``mmembed`` command: ``encode``, ``train``, ``validate``, ``components``, ``eval``.

A bad recipe or bad input is reported in one line naming the key, file or row, with exit code 2 and
no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import mmembed
from mmembed import dist
from mmembed.config import ConfigError, load_recipe
from mmembed.eval import run_eval
from mmembed.images import ImageError
from mmembed.io import ModelDirError
from mmembed.types import InputError

__all__ = ["main", "read_rows"]


_TRUST_HELP = "let transformers run Python code shipped with the model directory (off: a directory never opts in)"


class UsageError(ValueError):
    """Bad command-line input: printed without a traceback, exit code 2."""


def read_rows(path: str | Path) -> tuple[list[str | None], list[Any], list[str | None]]:
    """Read a JSONL of ``{"text", "image", "instruction"}`` rows; image paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: input file not found")
    texts, images, instructions = [], [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{n}: expected a JSON object with 'text' and/or 'image'")
            unknown = set(row) - {"text", "image", "instruction", "id"}
            if unknown:
                raise UsageError(
                    f"{path}:{n}: unknown field(s) {sorted(unknown)}; allowed: text, image, instruction, id"
                )
            text, image, instr = row.get("text"), row.get("image"), row.get("instruction")
            for key, value in (("text", text), ("image", image), ("instruction", instr)):
                if value is not None and not isinstance(value, str):
                    raise UsageError(f"{path}:{n}: field '{key}' must be a string, got {type(value).__name__}")
            if text is None and image is None:
                raise UsageError(f"{path}:{n}: a row needs 'text' or 'image'")
            if image is not None and not Path(image).is_absolute():
                image = str(path.parent / image)
            texts.append(text)
            images.append(image)
            instructions.append(instr)
    return texts, images, instructions


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    texts, images, instructions = read_rows(args.input)
    if args.instruction is not None:
        instructions = [i if i is not None else args.instruction for i in instructions]
    model = mmembed.load(args.model_dir, device=args.device, trust_remote_code=args.trust_remote_code)
    emb = model.encode(
        texts=texts, images=images, instruction=instructions, batch_size=args.batch_size, show_progress_bar=None
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, emb)
    print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:

    cfg = load_recipe(args.recipe, args.overrides)
    cfg.check_paths()
    print(f"{args.recipe}: ok (model backbone {cfg.model.backbone['type']}, pooler {cfg.model.pooler['type']})")
    return 0


def _components(args: argparse.Namespace) -> int:

    for slot, names in mmembed.list_components().items():
        print(f"{slot:10s} {', '.join(names)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    # local: the inference commands (encode, eval) never import the training code
    from mmembed.train.__main__ import main as train_main

    return train_main([args.recipe, *args.overrides])


def _eval(args: argparse.Namespace) -> int:

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    corpus = "all" if args.corpus == "all" else [d.strip() for d in (args.corpus or "").split(",") if d.strip()]
    if not str(args.model).startswith("openclip:") and not Path(args.model).is_dir():
        raise UsageError(f"{args.model}: not a model directory (or use openclip:ARCH[:PRETRAINED])")
    try:
        scores = run_eval(
            args.model,
            args.data,
            args.out,
            batch_size=args.batch_size,
            datasets=datasets,
            num_workers=args.num_workers,
            cache_dir=None if args.no_cache else (args.cache_dir or "auto"),
            corpus=corpus,
            n_examples=args.examples,
            image_root=args.image_root,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
        )
    except (ValueError, KeyError) as e:
        raise UsageError(str(e)) from None

    if dist.is_main_process():
        n = len(scores["datasets"])
        print(f"overall hit@1 {scores['overall']:.4f} over {n} datasets; wrote {args.out}/scores.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmembed", description="Train and serve multimodal embedding models.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encode", help="embed a JSONL of text/image rows into a .npy array")
    e.add_argument("model_dir")
    e.add_argument("--input", required=True, help="JSONL rows with 'text', 'image' and optional 'instruction'")
    e.add_argument("--output", required=True, help="output .npy path")
    e.add_argument("--instruction", default=None, help="instruction for rows that have none")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default=None)
    e.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    e.set_defaults(func=_encode)
    t = sub.add_parser("train", help="train a recipe on one process (use `deepspeed -m mmembed.train` to scale)")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.set_defaults(func=_train)
    v = sub.add_parser("validate", help="check a recipe without building anything")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(func=_validate)
    c = sub.add_parser("components", help="list registered component names")
    c.set_defaults(func=_components)
    ev = sub.add_parser("eval", help="MMEB-protocol scores (scores.json, scores.md, examples.html)")
    ev.add_argument("model", help="model directory, or openclip:ARCH[:PRETRAINED] for an open_clip baseline")
    ev.add_argument("--data", required=True, help="directory of MMEB eval files, one file, or a manifest YAML")
    ev.add_argument("--out", required=True, help="output directory")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--datasets", default=None, help="comma-separated dataset names (file stems) to evaluate")
    ev.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    ev.add_argument("--cache-dir", default=None, help="embedding cache root (default OUT/cache)")
    ev.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    ev.add_argument(
        "--corpus", default=None, help="datasets (comma-separated, or 'all') also ranked against their corpus"
    )
    ev.add_argument("--examples", type=int, default=3, help="queries per dataset shown in examples.html")
    ev.add_argument("--image-root", default=None)
    ev.add_argument("--device", default=None)
    ev.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    ev.set_defaults(func=_eval)
    return p


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"mmembed: config error: {e}", file=sys.stderr)
        return 2
    except (UsageError, InputError, ImageError, ModelDirError, FileNotFoundError) as e:
        print(f"mmembed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

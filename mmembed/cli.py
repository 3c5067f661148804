"""The ``mmembed`` command: ``encode``, ``train``, ``validate``, ``components``, ``eval``, ``compare``, ``serve``,
``index build`` / ``index search``.

A bad recipe or bad input is reported in one line naming the key, or the file and its 1-based line, with exit
code 2 and no traceback. ``mmembed COMMAND --help`` lists every option with its default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import mmembed
from mmembed import dist, index_cli
from mmembed.cli_rows import EncodeRows, UsageError, _locate, read_encode_rows, read_rows
from mmembed.config import ConfigError, load_recipe, to_dict
from mmembed.eval import compare as eval_compare
from mmembed.eval import run_eval
from mmembed.export import cli as export_cli
from mmembed.images import ImageError
from mmembed.io import ModelDirError
from mmembed.progress import Progress
from mmembed.serve import cli as serve_cli
from mmembed.types import InputError

__all__ = ["main", "build_parser", "read_rows", "read_encode_rows", "EncodeRows"]


_TRUST_HELP = "let transformers run Python code shipped with the model directory (off: a directory never opts in)"
_DEVICE_HELP = "torch device for the model, e.g. cuda, cuda:1 (default: cpu)"
_OUTPUT_SUFFIXES = (".npy", ".parquet")
#: model.encode calls per chunk of the CLI's progress: rows of ``8 * batch_size`` between two updates
_BATCHES_PER_CHUNK = 8


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless it states one itself); descriptions keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default is argparse.SUPPRESS
            or (action.required and action.option_strings)
        ):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        if action.nargs == argparse.ZERO_OR_MORE and not action.default:
            return f"{text} (default: none)"
        if action.default is None:
            return f"{text} (default: not set)"
        if isinstance(action.default, bool):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# encode


def _outputs(out: Path) -> list[Path]:
    """The files ``--output`` writes: ``X.npy`` and ``X.ids.json``, or ``X.parquet``."""
    if out.suffix not in _OUTPUT_SUFFIXES:
        raise UsageError(f"{out}: --output must end in .npy (plus X.ids.json) or .parquet")
    return [out, out.with_suffix(".ids.json")] if out.suffix == ".npy" else [out]


def _write_npy(out: Path, emb: Any, ids: list[Any]) -> None:
    import numpy as np

    ids_path = out.with_suffix(".ids.json")
    tmp, tmp_ids = (
        out.with_name(f".{out.name}.tmp-{os.getpid()}"),
        ids_path.with_name(f".{ids_path.name}.tmp-{os.getpid()}"),
    )
    try:
        with open(tmp, "wb") as f:
            np.save(f, emb)
        tmp_ids.write_text(json.dumps(ids, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        os.replace(tmp_ids, ids_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_ids.unlink(missing_ok=True)


def _write_parquet(out: Path, emb: Any, ids: list[Any], meta: dict[str, Any]) -> None:
    """``id`` (the ids' own type; strings when they mix types) and ``embedding`` (list<float32>) columns."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        id_col = pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        id_col = pa.array([i if isinstance(i, str) else json.dumps(i) for i in ids], type=pa.string())
        print(f"mmembed: note: the ids mix types; {out} stores them as strings", file=sys.stderr)
    n, d = emb.shape
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32), type=pa.int32())
    embedding = pa.ListArray.from_arrays(offsets, values)
    table = pa.table({"id": id_col, "embedding": embedding})
    table = table.replace_schema_metadata({"mmembed": json.dumps(meta)})
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    out = Path(args.output)
    targets = _outputs(out)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{', '.join(existing)} already exists; pass --overwrite to replace it")
    rows = read_encode_rows(args.input)
    model = mmembed.load(args.model_dir, device=args.device, trust_remote_code=args.trust_remote_code)
    prompts = dict(getattr(model.cfg, "prompts", {}) or {})
    instructions = [i if i is not None else args.instruction for i in rows.instructions]
    instructions = [prompts.get(i, i) if i is not None else None for i in instructions]  # saved prompt names
    chunk = args.batch_size * _BATCHES_PER_CHUNK
    parts = []
    with Progress(len(rows), "encode", "rows") as progress:
        for s in range(0, len(rows), chunk):
            e = min(s + chunk, len(rows))
            try:
                parts.append(
                    model.encode(
                        texts=rows.texts[s:e],
                        images=rows.images[s:e],
                        instruction=instructions[s:e],
                        batch_size=args.batch_size,
                        show_progress_bar=False,
                    )
                )
            except (InputError, ImageError) as err:
                raise _locate(err, rows, s) from None
            progress.update(e - s)
    emb = np.concatenate(parts) if parts else np.zeros((0, model.embed_dim), dtype=np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        _write_npy(out, emb, rows.ids)
        wrote = f"{out} and {targets[1].name}"
    else:
        meta = {"model": str(args.model_dir), "dim": int(emb.shape[1]), "input": str(rows.path)}
        _write_parquet(out, emb, rows.ids, meta)
        wrote = str(out)
    print(f"wrote {wrote}: {emb.shape[0]} x {emb.shape[1]} float32", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# the other commands


def _validate(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        import yaml

        applied = f" with {' '.join(args.overrides)}" if args.overrides else ""
        sys.stdout.write(f"# {args.recipe}{applied}, resolved: every key with its value\n")
        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
        sys.stdout.flush()
    cfg.check_paths()
    if not args.print_config:
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
        official = scores.get("official_overall")
        extra = f" (MMEB-official {official:.4f}, comparable with published tables)" if official is not None else ""
        print(f"overall hit@1 {scores['overall']:.4f}{extra} over {n} datasets; wrote {args.out}/scores.json")
    return 0


def _compare(args: argparse.Namespace) -> int:
    return eval_compare.run(args)


_ENCODE_EPILOG = """\
input rows (one JSON object per line; blank lines are skipped):
  {"id": "q1", "text": "a red circle", "instruction": "query"}
  {"image": "imgs/a.png"}
  {"text": "compare <image> with <image>", "image": ["imgs/a.png", "imgs/b.png"]}

output: X.npy (float32 rows in input order) plus X.ids.json (the ids, same order), or X.parquet with the
columns id and embedding (list<float32>). An existing output is never replaced without --overwrite.
"""

_TRAIN_EPILOG = """\
every recipe key, with its value after the overrides: mmembed validate --print-config RECIPE [key=value ...]
registered component names (for model.<slot>.type=...): mmembed components
to scale out: deepspeed -m mmembed.train RECIPE [key=value ...] (or torchrun -m mmembed.train)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``mmembed`` argument parser (every option's help names its default)."""
    p = argparse.ArgumentParser(
        prog="mmembed", description="Train and serve multimodal embedding models.", formatter_class=_HelpFormatter
    )
    p.add_argument("--version", action="version", version=f"mmembed {mmembed.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter, **kw)

    e = command("encode", "embed a JSONL of text/image rows into .npy (+ ids) or .parquet", epilog=_ENCODE_EPILOG)
    e.add_argument("model_dir", help="a saved model directory")
    e.add_argument("--input", required=True, help="JSONL rows with 'text' and/or 'image', optional 'instruction', 'id'")
    e.add_argument("--output", required=True, help="X.npy (writes X.ids.json too) or X.parquet")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.add_argument(
        "--instruction",
        default=None,
        help="instruction (text or a saved prompt name) for rows that have none (default: none, plain rows)",
    )
    e.add_argument("--batch-size", type=_positive_int, default=32, help="rows per forward pass")
    e.add_argument("--device", default=None, help=_DEVICE_HELP)
    e.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    e.set_defaults(func=_encode)

    t = command(
        "train", "train a recipe on one process (use `deepspeed -m mmembed.train` to scale)", epilog=_TRAIN_EPILOG
    )
    t.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/demo.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-5 model.pooler.type=mean")
    t.set_defaults(func=_train)

    v = command("validate", "check a recipe without building anything")
    v.add_argument("recipe", help="recipe YAML")
    v.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-5")
    v.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved recipe as YAML: every key with its value, after the overrides",
    )
    v.set_defaults(func=_validate)

    c = command("components", "list registered component names")
    c.set_defaults(func=_components)

    ev = command("eval", "MMEB-protocol scores (scores.json, scores.md, examples.html)")
    ev.add_argument("model", help="model directory, or openclip:ARCH[:PRETRAINED] for an open_clip baseline")
    ev.add_argument("--data", required=True, help="directory of MMEB eval files, one file, or a manifest YAML")
    ev.add_argument("--out", required=True, help="output directory")
    ev.add_argument("--batch-size", type=_positive_int, default=32, help="inputs per forward pass")
    ev.add_argument(
        "--datasets", default=None, help="comma-separated dataset names (file stems) to evaluate (default: all)"
    )
    ev.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    ev.add_argument("--cache-dir", default=None, help="embedding cache root (default: OUT/cache)")
    ev.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    ev.add_argument(
        "--corpus",
        default=None,
        help="datasets (comma-separated, or 'all') also ranked against their corpus (default: none)",
    )
    ev.add_argument("--examples", type=int, default=3, help="queries per dataset shown in examples.html")
    ev.add_argument(
        "--image-root",
        default=None,
        help="folder for relative image paths (default: an images/ or eval_images/ folder beside the data, else each "
        "data file's folder)",
    )
    ev.add_argument("--device", default=None, help=_DEVICE_HELP)
    ev.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    ev.set_defaults(func=_eval)

    cmp = command("compare", "several evaluations (scores.json, eval dirs, training runs) side by side")
    eval_compare.add_arguments(cmp)
    cmp.set_defaults(func=_compare)

    x = command("export", export_cli.DESCRIPTION)
    export_cli.add_arguments(x)
    x.set_defaults(func=export_cli.run)

    srv = command("serve", "an OpenAI-compatible embedding server (docs/serve.md)", epilog=serve_cli.EPILOG)
    serve_cli.add_arguments(srv)
    srv.set_defaults(func=serve_cli.run)

    ix = command("index", "FAISS index folders over encoded rows (mmembed.index): build, search")
    index_cli.add_arguments(ix, _HelpFormatter)

    return p


def main(argv: list[str] | None = None) -> int:
    """Run one ``mmembed`` command; returns the exit code (2: bad recipe or input, named in one line)."""
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

"""The ``mmembed`` command: ``encode``, ``train``, ``validate``, ``components``, ``eval``, ``compare``, ``serve``,
``index build`` / ``index search``.

A bad recipe or bad input is reported in one line naming the key, or the file and its 1-based line, with exit
code 2 and no traceback. ``mmembed COMMAND --help`` lists every option with its default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mmembed
from mmembed import dist
from mmembed.config import ConfigError, load_recipe, to_dict
from mmembed.eval import compare as eval_compare
from mmembed.eval import run_eval
from mmembed.images import ImageError
from mmembed.io import ModelDirError
from mmembed.progress import Progress
from mmembed.export import cli as export_cli
from mmembed.serve import cli as serve_cli
from mmembed.types import InputError

__all__ = ["main", "build_parser", "read_rows", "read_encode_rows", "EncodeRows"]


_TRUST_HELP = "let transformers run Python code shipped with the model directory (off: a directory never opts in)"
_DEVICE_HELP = "torch device for the model, e.g. cuda, cuda:1 (default: cpu)"
_ROW_FIELDS = ("text", "image", "instruction", "id")
_OUTPUT_SUFFIXES = (".npy", ".parquet")
#: model.encode calls per chunk of the CLI's progress: rows of ``8 * batch_size`` between two updates
_BATCHES_PER_CHUNK = 8


class UsageError(ValueError):
    """Bad command-line input: printed without a traceback, exit code 2."""


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


@dataclass
class EncodeRows:
    """The rows of an ``mmembed encode`` JSONL, aligned lists (one item per non-blank line).

    ``images`` items are ``None``, one path, or a list of paths (several images in one input), resolved against
    the file's folder; ``ids`` are the rows' ``id`` values (default: the 1-based line number); ``lines`` the
    1-based line of each row, for error messages.
    """

    path: Path
    texts: list[str | None] = field(default_factory=list)
    images: list[str | list[str] | None] = field(default_factory=list)
    instructions: list[str | None] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, i: int) -> str:
        """``file:LINE`` of row ``i`` (0-based index into the lists)."""
        return f"{self.path}:{self.lines[i]}"


def _image_field(value: Any, where: str, folder: Path) -> str | list[str] | None:
    """``image``: a path or a list of paths; relative paths resolve against ``folder``."""

    def resolve(p: str) -> str:
        return p if Path(p).is_absolute() else str(folder / p)

    if value is None or isinstance(value, str):
        return None if value is None else resolve(value)
    if isinstance(value, list):
        for j, item in enumerate(value):
            if not isinstance(item, str):
                raise UsageError(f"{where}: field 'image[{j}]' must be a string path, got {type(item).__name__}")
        return [resolve(p) for p in value] or None
    raise UsageError(f"{where}: field 'image' must be a string or a list of strings, got {type(value).__name__}")


def read_encode_rows(path: str | Path) -> EncodeRows:
    """Read a JSONL of ``{"text", "image", "instruction", "id"}`` rows (all optional, ``text`` or ``image`` needed).

    ``image`` is a path or a list of paths, relative to the file's folder; ``id`` any JSON scalar (default: the
    row's 1-based line number), unique in the file. Blank lines are skipped but counted.

    Raises:
        UsageError: naming ``file:LINE`` (1-based) and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: input file not found")
    rows = EncodeRows(path)
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{where}: expected a JSON object with 'text' and/or 'image'")
            unknown = set(row) - set(_ROW_FIELDS)
            if unknown:
                raise UsageError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(_ROW_FIELDS)}")
            text, instr = row.get("text"), row.get("instruction")
            for key, value in (("text", text), ("instruction", instr)):
                if value is not None and not isinstance(value, str):
                    raise UsageError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
            image = _image_field(row.get("image"), where, path.parent)
            if text is None and image is None:
                raise UsageError(f"{where}: a row needs 'text' or 'image'")
            row_id = row.get("id")
            if row_id is None:
                row_id = n
            elif not isinstance(row_id, (str, int, float, bool)):
                raise UsageError(
                    f"{where}: field 'id' must be a JSON scalar (string, number), got {type(row_id).__name__}"
                )
            key = json.dumps(row_id)
            if key in seen:
                raise UsageError(f"{where}: duplicate id {key} (also on line {seen[key]})")
            seen[key] = n
            rows.texts.append(text)
            rows.images.append(image)
            rows.instructions.append(instr)
            rows.ids.append(row_id)
            rows.lines.append(n)
    return rows


def read_rows(path: str | Path) -> tuple[list[str | None], list[Any], list[str | None]]:
    """``(texts, images, instructions)`` of an encode JSONL (see :func:`read_encode_rows`, which also has ids)."""
    rows = read_encode_rows(path)
    return rows.texts, rows.images, rows.instructions


_ROW_ERROR = re.compile(r"^row (\d+): (.*)$", re.DOTALL)


def _locate(err: Exception, rows: EncodeRows, offset: int) -> UsageError:
    """A model error naming ``row i`` of one encode call, renamed to ``file:LINE`` of the input."""
    text = str(err)
    m = _ROW_ERROR.match(text)
    if m and 0 <= offset + int(m.group(1)) < len(rows):
        return UsageError(f"{rows.where(offset + int(m.group(1)))}: {m.group(2)}")
    return UsageError(f"{rows.path}: {text}")


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


def _index_build(args: argparse.Namespace) -> int:
    """Encode (or read) the rows of an encode JSONL and write an :mod:`mmembed.index` folder."""
    import numpy as np

    from mmembed.eval import dir_fingerprint
    from mmembed.index import build_index

    rows = read_encode_rows(args.input)
    if args.embeddings:
        emb = np.load(args.embeddings, allow_pickle=False)
        if emb.ndim != 2 or emb.shape[0] != len(rows):
            raise UsageError(f"{args.embeddings}: {emb.shape[0] if emb.ndim else 0} embeddings for {len(rows)} rows")
    else:
        model = mmembed.load(args.model_dir, device=args.device, trust_remote_code=args.trust_remote_code)
        prompts = dict(getattr(model.cfg, "prompts", {}) or {})
        instructions = [i if i is not None else args.instruction for i in rows.instructions]
        instructions = [prompts.get(i, i) if i is not None else None for i in instructions]
        try:
            emb = model.encode(
                texts=rows.texts, images=rows.images, instruction=instructions, batch_size=args.batch_size
            )
        except (InputError, ImageError) as err:
            raise _locate(err, rows, 0) from None
    records = [
        {"id": i, "text": t, "image": im, "instruction": s}
        for i, t, im, s in zip(rows.ids, rows.texts, rows.images, rows.instructions)
    ]
    meta = {"model": str(Path(args.model_dir).resolve()), "model_fingerprint": dir_fingerprint(args.model_dir)}
    try:
        build_index(np.asarray(emb), records, args.index, kind=args.kind, meta=meta, overwrite=args.overwrite)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"indexed {len(records)} rows ({emb.shape[1]} dims, {args.kind}) into {args.index}", file=sys.stderr)
    return 0


def _index_search(args: argparse.Namespace) -> int:
    """The top ``k`` rows of an index for one text and/or image query."""
    from mmembed.eval import load_eval_model
    from mmembed.index import open_index

    if args.text is None and args.image is None:
        raise UsageError("give --text, --image or both")
    with open_index(args.index_dir) as index:
        spec = args.model or index.meta.get("model")
        if not spec:
            raise UsageError(f"{args.index_dir}: the index names no model; pass --model MODEL_DIR")
        model, _ = load_eval_model(spec, device=args.device, trust_remote_code=args.trust_remote_code)
        dim = index.dim if index.dim < model.embed_dim else None
        q = model.encode(texts=[args.text], images=[args.image], instruction=args.instruction, truncate_dim=dim)
        hits = index.search(q, args.k)[0]
    for hit in hits:
        if args.json:
            print(json.dumps(hit, ensure_ascii=False))
        else:
            image = hit.get("image")
            what = " ".join(x for x in (hit.get("text") or "", f"[{image}]" if image else "") if x)
            print(f"{hit['rank']:3d}  {hit['score']:+.4f}  {hit.get('id')}  {what}")
    return 0


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
    ix_sub = ix.add_subparsers(dest="index_command", required=True, metavar="ACTION", help="build or search")
    ib = ix_sub.add_parser(
        "build", help="encode JSONL rows into an index folder", description="encode JSONL rows into an index folder",
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    ib.add_argument("model_dir", help="the saved model directory the rows are encoded with (and queries, later)")
    ib.add_argument("--input", required=True, help="JSONL rows, as for mmembed encode (text, image, instruction, id)")
    ib.add_argument("--index", required=True, help="the index folder to write")
    ib.add_argument("--embeddings", default=None, help="X.npy of `mmembed encode` for these rows (skips encoding)")
    ib.add_argument("--kind", choices=("flat", "hnsw", "ivfpq"), default="flat", help="flat: exact; others approximate")
    ib.add_argument("--instruction", default=None, help="instruction for rows that have none (default: none)")
    ib.add_argument("--batch-size", type=_positive_int, default=32, help="rows per forward pass")
    ib.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    ib.add_argument("--device", default=None, help=_DEVICE_HELP)
    ib.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    ib.set_defaults(func=_index_build)
    iq = ix_sub.add_parser(
        "search", help="top-k rows for a text and/or image query", description="top-k rows for a text and/or image "
        "query", formatter_class=_HelpFormatter,
    )  # fmt: skip
    iq.add_argument("index_dir", help="an index folder (mmembed index build)")
    iq.add_argument("--text", default=None, help="query text")
    iq.add_argument("--image", default=None, help="query image path")
    iq.add_argument("--instruction", default=None, help="query instruction or saved prompt name (default: none)")
    iq.add_argument("-k", type=_positive_int, default=5, help="rows to return")
    iq.add_argument("--model", default=None, help="model directory (default: the one the index was built with)")
    iq.add_argument("--json", action="store_true", help="one JSON object per hit")
    iq.add_argument("--device", default=None, help=_DEVICE_HELP)
    iq.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    iq.set_defaults(func=_index_search)
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

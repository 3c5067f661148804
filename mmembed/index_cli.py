"""``mmembed index build|search``: FAISS index folders over encoded rows (:mod:`mmembed.index`, docs/serve.md).

``mmembed serve MODEL_DIR --index DIR`` serves the same folders over HTTP (``POST /v1/search``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mmembed
from mmembed.images import ImageError
from mmembed.types import InputError

__all__ = ["add_arguments"]


def add_arguments(ix: argparse.ArgumentParser, formatter: type[argparse.HelpFormatter]) -> None:
    """Mount ``build`` and ``search`` under the ``index`` subcommand parser ``ix``."""
    from mmembed.cli import _DEVICE_HELP, _TRUST_HELP, _positive_int

    ix_sub = ix.add_subparsers(dest="index_command", required=True, metavar="ACTION", help="build or search")
    ib = ix_sub.add_parser(
        "build", help="encode JSONL rows into an index folder", description="encode JSONL rows into an index folder",
        formatter_class=formatter,
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
    ib.set_defaults(func=_build)
    iq = ix_sub.add_parser(
        "search", help="top-k rows for a text and/or image query", description="top-k rows for a text and/or image "
        "query", formatter_class=formatter,
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
    iq.set_defaults(func=_search)


def _build(args: argparse.Namespace) -> int:
    """Encode (or read) the rows of an encode JSONL and write an :mod:`mmembed.index` folder."""
    import numpy as np

    from mmembed.cli_rows import UsageError, _locate, read_encode_rows
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


def _search(args: argparse.Namespace) -> int:
    """The top ``k`` rows of an index for one text and/or image query."""
    from mmembed.cli_rows import UsageError
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

"""A FAISS (CPU) index over encoded embeddings, queried by text or image from the command line.

Build from rows to encode (the JSONL of ``mmembed encode``: ``{"text", "image", "instruction", "id"}``),
from already encoded rows (``--embeddings X.npy`` from ``mmembed encode`` + the same ``--input``), or
from the distinct candidates of MMEB eval data (``--eval-data``):

    python tools/search.py build MODEL --input corpus.jsonl --index idx/
    python tools/search.py build MODEL --input corpus.jsonl --embeddings corpus.npy --index idx/
    python tools/search.py build MODEL --eval-data demo/eval/caption_t2i.parquet --index idx/
    python tools/search.py query idx/ --text "a red circle" [--image q.png] [--instruction ...] [-k 5]

MODEL is a model directory or ``openclip:ARCH[:PRETRAINED]``. The folder is :mod:`mmembed.index`'s: an
inner-product FAISS index (``--kind flat`` exact, the default; ``hnsw`` or ``ivfpq`` approximate), ``rows.jsonl``
(what each vector is) with its byte offsets, and ``meta.json`` (model, dim, kind). A query memory-maps the index
and reads only the rows it returns; an existing folder is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mmembed.index import KINDS, Index, open_index
from mmembed.index import build_index as build

__all__ = ["build_index", "search", "main"]


def _rows_from_eval(path: str, placeholder: str) -> list[dict[str, Any]]:
    from mmembed.eval import load_eval_sets
    from mmembed.eval.embed import side_key

    seen, rows = set(), []
    for name, examples in load_eval_sets(path, placeholder=placeholder).items():
        for ex in examples:
            for c in ex.candidates:
                k = side_key(c)
                if k in seen or ex.meta.get("missing_images"):
                    continue
                seen.add(k)
                image = str(c.images[0]) if c.images else None
                rows.append({"id": f"{name}:{len(rows)}", "text": c.text, "image": image, "instruction": c.instruction})
    return rows


def build_index(
    model_spec: str,
    index_dir: str | Path,
    *,
    input_jsonl: str | None = None,
    embeddings: str | None = None,
    eval_data: str | None = None,
    batch_size: int = 32,
    kind: str = "flat",
    overwrite: bool = False,
) -> int:
    """Encode (or read) the rows and write the index folder (:func:`mmembed.index.build_index`); returns the count."""
    from mmembed.cli import read_rows
    from mmembed.eval import load_eval_model
    from mmembed.eval.run import placeholder_of

    model, fp = load_eval_model(model_spec)
    if eval_data:
        rows = _rows_from_eval(eval_data, placeholder_of(model))
    elif input_jsonl:
        texts, images, insts = read_rows(input_jsonl)
        rows = [
            {"id": str(i), "text": t, "image": im, "instruction": s}
            for i, (t, im, s) in enumerate(zip(texts, images, insts))
        ]
    else:
        raise ValueError("give --input or --eval-data")
    if embeddings:
        emb = np.load(embeddings, allow_pickle=False)
        if emb.shape[0] != len(rows):
            raise ValueError(f"{embeddings}: {emb.shape[0]} embeddings for {len(rows)} rows of {input_jsonl}")
    else:
        emb = model.encode(
            texts=[r["text"] for r in rows],
            images=[r["image"] for r in rows],
            instruction=[r["instruction"] for r in rows],
            batch_size=batch_size,
            show_progress_bar=None,
        )
    meta = {"model": model_spec, "model_fingerprint": fp}
    build(np.asarray(emb), rows, index_dir, kind=kind, meta=meta, overwrite=overwrite)
    return len(rows)


def search(
    index_dir: str | Path,
    *,
    text: str | None = None,
    image: str | None = None,
    instruction: str | None = None,
    k: int = 5,
    model: Any = None,
    index: Index | None = None,
) -> list[dict[str, Any]]:
    """Top-``k`` rows for one text and/or image query: ``[{"rank", "score", "id", "text", "image"}]``.

    ``model`` and ``index`` (an open :class:`mmembed.index.Index`) may be passed to keep them loaded between queries.
    """
    from mmembed.eval import load_eval_model

    if text is None and image is None:
        raise ValueError("give a query text, an image, or both")
    opened = index is None
    index = open_index(index_dir) if opened else index
    try:
        if model is None:
            model, _ = load_eval_model(index.meta["model"])
        q = model.encode(texts=[text], images=[image], instruction=instruction, batch_size=1)
        hits = index.search(np.asarray(q, dtype=np.float32), k)[0]
    finally:
        if opened:
            index.close()
    return [{key: h.get(key) for key in ("rank", "score", "id", "text", "image")} for h in hits]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode rows and write a FAISS index")
    b.add_argument("model")
    b.add_argument("--index", required=True)
    b.add_argument("--input", default=None, help="JSONL rows (text, image, instruction, id)")
    b.add_argument("--embeddings", default=None, help=".npy from `mmembed encode` for the --input rows")
    b.add_argument("--eval-data", default=None, help="MMEB eval file/folder: index its distinct candidates")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--kind", choices=KINDS, default="flat", help="flat: exact; hnsw, ivfpq: approximate, sub-linear")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    q = sub.add_parser("query", help="top-k rows for a text and/or image query")
    q.add_argument("index")
    q.add_argument("--text", default=None)
    q.add_argument("--image", default=None)
    q.add_argument("--instruction", default=None)
    q.add_argument("-k", type=int, default=5)
    a = p.parse_args(argv)
    try:
        if a.cmd == "build":
            n = build_index(
                a.model,
                a.index,
                input_jsonl=a.input,
                embeddings=a.embeddings,
                eval_data=a.eval_data,
                batch_size=a.batch_size,
                kind=a.kind,
                overwrite=a.overwrite,
            )
            print(f"indexed {n} rows into {a.index}")
        else:
            for hit in search(a.index, text=a.text, image=a.image, instruction=a.instruction, k=a.k):
                what = " ".join(x for x in (hit["text"] or "", f"[{hit['image']}]" if hit["image"] else "") if x)
                print(f"{hit['rank']:3d}  {hit['score']:+.4f}  {hit['id']}  {what}")
    except (ValueError, FileNotFoundError) as e:
        print(f"search: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

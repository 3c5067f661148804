"""A FAISS index folder over embeddings, opened once and queried in time that does not grow with its rows.

Folder layout (written to a temporary folder and renamed into place, so a crash never leaves half an index):

    index.faiss         the FAISS index (inner product: cosine for normalized embeddings, MMEB's similarity)
    rows.jsonl          what each vector is, one JSON object per line, in vector order
    rows.offsets.npy    (N,) int64 byte offset of each line of rows.jsonl
    meta.json           kind, factory string, dim, count, model, model_fingerprint

Opening costs no work per row: a flat index is memory-mapped (``faiss.IO_FLAG_MMAP_IFC``), the offsets are
memory-mapped, and a query reads only the ``k`` lines it returns. Kinds (``faiss.index_factory`` strings):

- ``flat``: exact (``Flat``); a query scans all N vectors.
- ``hnsw``: ``HNSW32,Flat`` (Malkov & Yashunin, arXiv 1603.09320): graph search, sub-linear in N, approximate;
  ``efSearch`` (default 64) trades recall for time.
- ``ivfpq``: ``IVF{nlist},PQ{m}`` (Jegou et al., TPAMI 2011): ``nlist = 4 sqrt(N)`` clusters, ``m`` sub-quantizers
  of 8 bits (4 below 10k vectors, too few to train 256 codes; ``m`` the largest divisor of the dimension that is at
  most ``dim / 2`` and 64), trained on ``max(39 nlist, 65536)`` sampled vectors (FAISS's minimum of 39 per cluster);
  ``nprobe`` (default 16) clusters are searched. Compact, approximate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KINDS", "build_index", "open_index", "Index", "factory_string"]

KINDS = ("flat", "hnsw", "ivfpq")


def factory_string(kind: str, n: int, dim: int) -> str:
    """The ``faiss.index_factory`` description of ``kind`` for ``n`` vectors of ``dim`` dimensions."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    if kind == "ivfpq":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per centroid
        m = max(d for d in range(1, min(64, max(1, dim // 2)) + 1) if dim % d == 0)
        bits = 8 if n >= 10_000 else 4  # 256 codes per sub-quantizer need ~10k training points (FAISS: 39 per code)
        return f"IVF{nlist},PQ{m}x{bits}"
    raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")


def build_index(
    embeddings: np.ndarray,
    rows: list[dict[str, Any]],
    folder: str | os.PathLike,
    *,
    kind: str = "flat",
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> Path:
    """Write an index folder for ``embeddings`` (N, D) and their ``rows``; returns the folder.

    An existing non-empty ``folder`` is refused unless ``overwrite`` (then replaced only once the new one is
    complete).
    """
    import faiss

    out = Path(folder)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(rows):
        raise ValueError(f"{emb.shape[0] if emb.ndim else 0} embeddings for {len(rows)} rows (expected (N, D), N rows)")
    if emb.shape[0] == 0:
        raise ValueError("nothing to index: zero rows")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: already holds files; pass overwrite=True (--overwrite) to replace the index")
    desc = factory_string(kind, emb.shape[0], emb.shape[1])
    index = faiss.index_factory(emb.shape[1], desc, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        nlist = int(desc.split(",")[0][3:])
        sample = emb[rng.choice(emb.shape[0], min(emb.shape[0], max(39 * nlist, 1 << 16)), replace=False)]
        index.train(sample)
    index.add(emb)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        faiss.write_index(index, str(tmp / "index.faiss"))
        lines = [(json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows]
        offsets = np.zeros(len(lines), dtype=np.int64)
        np.cumsum([len(b) for b in lines[:-1]], out=offsets[1:])
        (tmp / "rows.jsonl").write_bytes(b"".join(lines))
        np.save(tmp / "rows.offsets.npy", offsets)
        info = {**(meta or {}), "kind": kind, "factory": desc, "dim": int(emb.shape[1]), "count": len(rows)}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an index is shared like a model directory
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Index:
    """An opened index folder: ``search(queries (Q, D), k) -> [[{"rank", "score", **row}, ...], ...]``."""

    def __init__(self, folder: str | os.PathLike, *, ef_search: int = 64, nprobe: int = 16) -> None:
        import faiss

        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder}: not an index folder (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        self.dim, self.count = int(self.meta["dim"]), int(self.meta["count"])
        path = str(self.folder / "index.faiss")
        flat = self.meta.get("kind", "flat") == "flat"
        self.index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC if flat else 0)
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = ef_search
        if hasattr(faiss, "extract_index_ivf") and "IVF" in self.meta.get("factory", ""):
            faiss.extract_index_ivf(self.index).nprobe = nprobe
        offsets = self.folder / "rows.offsets.npy"
        if offsets.is_file():
            self.offsets = np.load(offsets, mmap_mode="r", allow_pickle=False)
        else:  # an index written before the offsets existed: index the rows once
            from mmembed.data.sources import index_lines

            self.offsets = index_lines(self.folder / "rows.jsonl")[0]
        if len(self.offsets) != self.index.ntotal:
            raise ValueError(f"{self.folder}: {self.index.ntotal} vectors but {len(self.offsets)} rows")
        self._rows = open(self.folder / "rows.jsonl", "rb")

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` of ``rows.jsonl`` (one seek and one line read)."""
        self._rows.seek(int(self.offsets[i]))
        return json.loads(self._rows.readline())

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-``k`` rows per query; ``queries`` (Q, D) float32 (or (D,))."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"{self.folder}: index has dimension {self.dim} but the queries have {q.shape[1]}")
        scores, ids = self.index.search(q, max(1, min(k, self.index.ntotal)))
        return [
            [
                {"rank": r + 1, "score": float(s), **self.row(int(i))}
                for r, (s, i) in enumerate(zip(srow, irow))
                if i >= 0
            ]
            for srow, irow in zip(scores, ids)
        ]

    def close(self) -> None:
        self._rows.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_index(folder: str | os.PathLike, **kw: Any) -> Index:
    """Open an index folder written by :func:`build_index` (see :class:`Index` for ``ef_search``/``nprobe``)."""
    return Index(folder, **kw)

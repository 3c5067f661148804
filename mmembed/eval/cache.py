"""The on-disk embedding cache of the evaluator and the fingerprints that key it.

``CACHE/<model fingerprint>/<dataset>-<data fingerprint>/part-*.npy`` + ``part-*.json`` (row indices, dimension).
Parts are written as they are encoded (array first, then its JSON, both renamed into place), so a run killed
half-way leaves complete parts and a rerun encodes only the rest. No pickle: arrays are read with
``allow_pickle=False``. (Split out of :mod:`mmembed.eval.embed`, which re-exports these names.)
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mmembed.eval.embed import Plan

__all__ = ["EmbeddingCache", "dir_fingerprint", "model_fingerprint"]


# ----------------------------------------------------------------------------------------------
# fingerprints


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def dir_fingerprint(
    directory: str | os.PathLike, files: Sequence[str] = ("model.safetensors", "mmembed_config.json")
) -> str:
    """Hash of a saved model directory's weights and config (32 hex digits)."""
    h = hashlib.blake2b(digest_size=16)
    for name in files:
        p = Path(directory) / name
        if p.is_file():
            h.update(name.encode())
            _hash_file(h, p)
    return h.hexdigest()


def model_fingerprint(model: Any) -> str:
    """``model.fingerprint`` when set (loaded models), else a hash of the state dict (in-memory models)."""
    fp = getattr(model, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    state = getattr(model, "state_dict", None)
    if state is None:
        raise ValueError(f"cannot fingerprint a {type(model).__name__}: give it a 'fingerprint' attribute")
    h = hashlib.blake2b(digest_size=16)
    for k, v in state().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# cache


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class EmbeddingCache:
    """Embeddings on disk as ``.npy`` parts with JSON indices, keyed by model and data fingerprints."""

    def __init__(self, root: str | os.PathLike, model_fp: str) -> None:
        self.root = Path(root) / model_fp[:32]
        self.model_fp = model_fp

    def folder(self, plan: Plan) -> Path:
        return self.root / f"{_safe(plan.name)}-{plan.fingerprint[:16]}"

    def load(self, plan: Plan, dim: int | None = None) -> tuple[np.ndarray | None, np.ndarray]:
        """Cached rows of ``plan``: ``(emb (U, D) or None, have (U,) bool)``.

        Raises:
            ValueError: a part whose dimension differs from ``dim`` or from the other parts, or whose
                indices do not fit the dataset, naming the dataset and the part file.
        """
        n = len(plan.sides)
        have = np.zeros(n, dtype=bool)
        emb = None
        folder = self.folder(plan)
        for meta_path in sorted(folder.glob("part-*.json")) if folder.is_dir() else []:
            arr_path = meta_path.with_suffix(".npy")
            meta = json.loads(meta_path.read_text())
            arr = np.load(arr_path, allow_pickle=False)
            idx = np.asarray(meta["indices"], dtype=np.int64)
            where = f"embedding cache of eval set '{plan.name}' ({arr_path})"
            if arr.ndim != 2 or arr.shape[0] != idx.size:
                raise ValueError(f"{where}: {arr.shape} array for {idx.size} rows; delete the folder to re-encode")
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"{where}: row index {int(idx.max())} out of range for {n} inputs")
            want = dim if dim is not None else (emb.shape[1] if emb is not None else arr.shape[1])
            if arr.shape[1] != want:
                raise ValueError(
                    f"{where}: embedding dimension {arr.shape[1]} but the model gives {want}; "
                    f"the cache belongs to another model: delete {folder} to re-encode"
                )
            if emb is None:
                emb = np.zeros((n, arr.shape[1]), dtype=np.float32)
            emb[idx] = arr
            have[idx] = True
        return emb, have

    def write(self, plan: Plan, indices: np.ndarray, emb: np.ndarray) -> None:
        """Add one part (atomic: temporary names, array before its JSON)."""
        folder = self.folder(plan)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"part-{int(indices[0]):08d}-{uuid.uuid4().hex[:8]}"
        tmp = folder / f".{stem}.tmp.npy"
        np.save(tmp, np.ascontiguousarray(emb, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, folder / f"{stem}.npy")
        meta = {"dataset": plan.name, "indices": [int(i) for i in indices], "dim": int(emb.shape[1])}
        meta.update(model=self.model_fp, data=plan.fingerprint)
        tmp_json = folder / f".{stem}.tmp.json"
        tmp_json.write_text(json.dumps(meta))
        os.replace(tmp_json, folder / f"{stem}.json")

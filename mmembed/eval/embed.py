"""Encoding for evaluation: unique inputs, an on-disk embedding cache, and sharding over ranks.

- **De-duplication.** Every query and candidate of a dataset is reduced to its content (instruction,
  text, image references); each distinct input is encoded once (VLM2Vec ``cand_name`` de-duplication,
  ``generate_cand_dataset``). Classification label sets shared by all queries cost one encode each.
- **Cache.** ``CACHE/<model fingerprint>/<dataset>-<data fingerprint>/part-*.npy`` + ``part-*.json``
  (row indices, dimension). Parts are written as they are encoded (array first, then its JSON, both
  renamed into place), so a run killed half-way leaves complete parts and a rerun encodes only the
  rest. No pickle: arrays are read with ``allow_pickle=False``. VLM2Vec ``eval.py`` caches pickles.
- **Sharding.** Under ``torchrun``/``deepspeed`` each block of missing rows is split into equal,
  contiguous shares (padded by repeating a row, so every rank runs the same number of forwards, which
  ZeRO-3 requires); shares are gathered with :func:`mmembed.dist.all_gather_object`. Rank 0 writes the
  cache. Which rows are missing is decided on rank 0 and broadcast.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmembed import dist
from mmembed.data.dataset import decode_side
from mmembed.data.formats import EvalExample
from mmembed.data.sample import Side
from mmembed.data.skips import BadSample

__all__ = ["side_key", "Plan", "plan_dataset", "EmbeddingCache", "encode_plan", "dir_fingerprint", "model_fingerprint"]


def side_key(side: Side) -> tuple:
    """Content identity of an input: instruction, text and image references."""
    imgs = tuple(_image_id(i) for i in side.images)
    return (side.instruction or "", side.text or "", imgs)


def _image_id(im: Any) -> str:
    if isinstance(im, (str, os.PathLike)):
        return str(im)
    if isinstance(im, (bytes, bytearray)):
        return "bytes:" + hashlib.blake2b(bytes(im), digest_size=12).hexdigest()
    return "array:" + hashlib.blake2b(np.asarray(im).tobytes(), digest_size=12).hexdigest()


@dataclass
class Plan:
    """The unique inputs of one dataset and how each example refers to them.

    Attributes:
        sides: the U distinct inputs, in first-seen order (query of row 0, its candidates, row 1, ...).
        query_idx: (N,) index into ``sides`` of each row's query.
        cand_idx: per row, the indices into ``sides`` of its candidates (positive at ``ex.positive``).
        missing: (U,) True where the input has a missing image file: never encoded.
        missing_rows: (N,) True where the row's query or any candidate has a missing (or, once encoded,
            unreadable) image.
        fingerprint: hash of the ordered inputs (changes with the file, instructions or placeholder).
    """

    name: str
    sides: list[Side]
    query_idx: np.ndarray
    cand_idx: list[np.ndarray]
    missing: np.ndarray
    missing_rows: np.ndarray
    fingerprint: str
    examples: Sequence[EvalExample] = field(default_factory=list)
    unreadable_rows: np.ndarray | None = None  # set by encode_plan: rows whose image could not be decoded
    unreadable_example: str = ""  # the first of them, "file:line: image ...: reason"


def plan_dataset(name: str, examples: Sequence[EvalExample]) -> Plan:
    """De-duplicate the inputs of ``examples``; raises ValueError naming the dataset and row on bad rows."""
    if not examples:
        raise ValueError(f"eval set '{name}' is empty")
    keys: dict[tuple, int] = {}
    sides: list[Side] = []
    missing: list[bool] = []
    h = hashlib.blake2b(digest_size=16)

    def index(side: Side, is_missing: bool) -> int:
        k = side_key(side)
        if k not in keys:
            keys[k] = len(sides)
            sides.append(side)
            missing.append(False)
            h.update(repr(k).encode())
        i = keys[k]
        missing[i] = missing[i] or is_missing
        return i

    q_idx, c_idx, miss_rows = [], [], []
    for row, ex in enumerate(examples):
        where = f"eval set '{name}', row {row}" + (f" ({ex.source})" if ex.source else "")
        if not ex.candidates:
            raise ValueError(f"{where}: empty candidate list")
        if not 0 <= ex.positive < len(ex.candidates):
            raise ValueError(f"{where}: positive index {ex.positive} out of range for {len(ex.candidates)} candidates")
        marks = set(ex.meta.get("missing_images") or ())
        q_idx.append(index(ex.query, "query" in marks))
        c_idx.append(np.array([index(c, f"candidate {j}" in marks) for j, c in enumerate(ex.candidates)]))
        h.update(f"|{q_idx[-1]}:{','.join(map(str, c_idx[-1]))}:{ex.positive}".encode())
        miss_rows.append(bool(marks))
    return Plan(
        name=name,
        sides=sides,
        query_idx=np.array(q_idx),
        cand_idx=c_idx,
        missing=np.array(missing, dtype=bool),
        missing_rows=np.array(miss_rows, dtype=bool),
        fingerprint=h.hexdigest(),
        examples=examples,
    )


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


# ----------------------------------------------------------------------------------------------
# encoding


class _Decode:
    """Map-style dataset decoding the images of each side (runs in DataLoader workers).

    Item ``i`` is ``(decoded side, None)`` or ``(None, reason)`` for an input whose image cannot be decoded: the
    evaluator scores such rows as misses instead of stopping (MMEB keeps them in the denominator)."""

    def __init__(self, sides: Sequence[Side], max_pixels: int | None = None) -> None:
        self.sides, self.max_pixels = sides, max_pixels

    def __len__(self) -> int:
        return len(self.sides)

    def __getitem__(self, i: int) -> tuple[Side | None, str | None]:

        try:
            if self.max_pixels is None:
                return decode_side(self.sides[i]), None
            return decode_side(self.sides[i], self.max_pixels), None
        except BadSample as e:
            return None, e.detail


def _identity(x: Any) -> Any:
    return x


def _encode_sides(
    model: Any, sides: Sequence[Side], batch_size: int, num_workers: int, group: int = 256
) -> tuple[np.ndarray, dict[int, str]]:
    """``(len(sides), D)`` embeddings (rows of unreadable inputs are 0) and ``{position: reason}`` of those.

    Images are decoded ``group`` rows at a time (in ``num_workers`` DataLoader workers when > 0), so memory holds
    one group of decoded images, never the whole block."""
    max_pixels = getattr(getattr(model, "processor", None), "max_pixels", None)
    decoder = _Decode(sides, max_pixels)
    items: Any = (decoder[i] for i in range(len(sides)))
    if num_workers > 0 and any(s.images for s in sides):
        from torch.utils.data import DataLoader

        items = iter(DataLoader(decoder, batch_size=None, num_workers=num_workers, collate_fn=_identity))
    out: np.ndarray | None = None
    bad: dict[int, str] = {}
    for start in range(0, len(sides), group):
        chunk = [next(items) for _ in range(min(group, len(sides) - start))]
        good = [j for j, (side, _) in enumerate(chunk) if side is not None]
        bad.update({start + j: reason for j, (side, reason) in enumerate(chunk) if side is None})
        if not good:
            continue
        emb = model.encode(
            texts=[chunk[j][0].text for j in good],
            images=[list(chunk[j][0].images) or None for j in good],
            instruction=[chunk[j][0].instruction for j in good],
            batch_size=batch_size,
            show_progress_bar=False,
        )
        emb = np.asarray(emb, dtype=np.float32)
        if out is None:
            out = np.zeros((len(sides), emb.shape[1]), dtype=np.float32)
        out[[start + j for j in good]] = emb
    return (out if out is not None else np.zeros((len(sides), 0), dtype=np.float32)), bad


def encode_plan(
    model: Any,
    plan: Plan,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    cache: EmbeddingCache | None = None,
    block_rows: int = 1024,
    dim: int | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Embeddings of every unique input of ``plan``: ``(U, D)`` float32; rows of missing inputs are 0.

    Collective under a process group: every rank must call it with the same plan. Returns the
    embeddings (identical on every rank) and ``{"encoded", "cached", "missing"}`` row counts.
    """
    n = len(plan.sides)
    cached, have, error = None, np.zeros(n, dtype=bool), None
    if cache is not None and dist.is_main_process():
        try:
            cached, have = cache.load(plan, dim)
        except ValueError as e:  # raised on every rank below, so that no rank waits forever
            error = str(e)
    have, error = dist.broadcast_object((have, error))
    if error:
        raise ValueError(error)
    todo = np.nonzero(~have & ~plan.missing)[0]
    stats = {"encoded": int(todo.size), "cached": int(have.sum()), "missing": int(plan.missing.sum())}
    world, rank = dist.get_world_size(), dist.get_rank()
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    unreadable: dict[int, str] = {}
    step = max(block_rows, world * batch_size)
    for start in range(0, todo.size, step):
        block = todo[start : start + step]
        share = -(-block.size // world)
        mine = block[rank * share : (rank + 1) * share]
        real = mine.size
        if real < share:  # equal forwards on every rank: pad with a repeat of the block's first row
            mine = np.concatenate([mine, np.full(share - real, block[0])])
        try:
            out, bad = _encode_sides(model, [plan.sides[i] for i in mine], batch_size, num_workers)
            out, bad, error = out[:real], {int(mine[j]): r for j, r in bad.items() if j < real}, None
        except Exception as e:  # noqa: BLE001 - re-raised on every rank after the gather
            if world == 1:
                raise
            out, bad = np.zeros((0, 0), dtype=np.float32), {}
            error = f"eval set '{plan.name}', rank {rank}: {e}"
        gathered = dist.all_gather_object((mine[:real], out, error, bad))
        errors = [g[2] for g in gathered if g[2]]
        if errors:
            raise RuntimeError(errors[0])
        for g in gathered:
            unreadable.update(g[3])
        idx = np.concatenate([g[0] for g in gathered])
        emb = np.concatenate([g[1] for g in gathered if g[1].size] or [out])
        if unreadable:  # never cache an unreadable input: a fixed file is encoded on the next run
            keep = ~np.isin(idx, list(unreadable))
            idx, emb = idx[keep], emb[keep]
        if not idx.size:
            continue
        if dim is None:
            dim = emb.shape[1]
        elif emb.shape[1] != dim:
            raise ValueError(f"eval set '{plan.name}': the model gives {emb.shape[1]}-dim embeddings, expected {dim}")
        if cache is not None and dist.is_main_process():
            cache.write(plan, idx, emb)
        parts.append((idx, emb))
    _mark_unreadable(plan, unreadable)
    if dist.get_world_size() > 1 and cache is not None:
        cached = dist.broadcast_object(cached)
    d = dim or (cached.shape[1] if cached is not None else None)
    if d is None:
        if parts:
            d = parts[0][1].shape[1]
        else:  # every input has a missing or unreadable image
            return np.zeros((n, 1), dtype=np.float32), stats
    full = np.zeros((n, d), dtype=np.float32)
    if cached is not None:
        if cached.shape[1] != d:
            raise ValueError(
                f"embedding cache of eval set '{plan.name}': dimension {cached.shape[1]} but the model gives {d}"
            )
        full[have] = cached[have]
    for idx, emb in parts:
        full[idx] = emb
    return full, stats


def _mark_unreadable(plan: Plan, unreadable: dict[int, str]) -> None:
    """Treat inputs whose image could not be decoded like missing ones: every row using them is a miss."""
    if not unreadable:
        return
    bad = np.zeros(len(plan.sides), dtype=bool)
    bad[list(unreadable)] = True
    plan.missing |= bad
    rows = bad[plan.query_idx] | np.array([bad[c].any() for c in plan.cand_idx])
    plan.unreadable_rows = rows & ~plan.missing_rows
    plan.missing_rows = plan.missing_rows | rows
    first_row = int(np.nonzero(rows)[0][0])
    src = plan.examples[first_row].source or f"row {first_row + 1}"
    first_side = int(next(i for i in (plan.query_idx[first_row], *plan.cand_idx[first_row]) if bad[i]))
    plan.unreadable_example = f"{src}: {unreadable[first_side]}"

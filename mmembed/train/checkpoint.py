"""Atomic, verified training checkpoints: DeepSpeed engine state + the run's own state, written under a
temporary name and renamed only when every rank has finished, so a half-written one is never picked.

Layout: ``<output_dir>/checkpoints/step_<N>/`` holding DeepSpeed's ``state/`` folder (model,
optimizer, scheduler; ZeRO shards per rank), ``trainer_state.json`` (step, data position, loss
history length) and ``skips_rank<R>.json`` (each rank's bad-sample counter). ``MANIFEST.json`` lists
every other file with its size and sha256 (written after all ranks finished, before ``COMPLETE``,
which marks the checkpoint finished). Dropout randomness is reseeded from (seed, step, rank) at every
step, so no generator state has to travel: a resumed run draws exactly what the uninterrupted run drew.

On resume the manifest is checked first (sizes, hashes, no missing or extra files): ``resume=auto``
skips a checkpoint that fails, with one line saying why, and takes the newest one that verifies; an
explicit ``resume=PATH`` that fails stops with a :class:`CheckpointError` naming the file. Checkpoints
from before manifests existed are accepted with a warning after a structural check (``trainer_state.json``
parses, ``state/`` holds non-empty torch files whose zip CRCs match). DeepSpeed's files are unpickled
with the weights-only loader of :mod:`mmembed.train.safe_load`, so a checkpoint cannot run code.

Rotation (``train.save_total_limit``) keeps the newest N complete checkpoints after each save, and never the one
the run resumed from (the only state this run has proven loadable) nor the one just written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmembed import dist
from mmembed.train.safe_load import CheckpointError, UnsafeCheckpointError, restricted_torch_load

__all__ = [
    "save_checkpoint",
    "find_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "clean_stale_temporaries",
    "rotate_checkpoints",
    "CheckpointError",
    "UnsafeCheckpointError",
    "TAG",
    "MARKER",
    "MANIFEST",
]

TAG = "state"
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
SPACE_MARGIN = 1.05  # a new checkpoint can be slightly larger than the last one (data position, metadata)


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """``train.resume`` names a folder that is not a complete checkpoint."""


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _stderr(text: str) -> None:
    if dist.is_main_process():
        print(text, file=sys.stderr, flush=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MARKER).is_file() and _step_of(p) >= 0]
    return sorted(found, key=_step_of)


def find_checkpoint(
    resume: str, root: Path, *, verify: bool = False, report: Callable[[str], None] = _stderr
) -> Path | None:
    """``train.resume``: ``none`` -> None; ``auto`` -> the newest complete checkpoint (or None); else that path,
    which must be complete.

    With ``verify`` (what the training loop uses) each candidate is also checked against its manifest:
    ``auto`` skips one that fails, reporting which and why in one line, and takes the newest that verifies;
    an explicit path that fails is an error. Verifying is collective when several ranks run (the hashing is
    shared out). Without it the lookup only looks at ``COMPLETE`` markers: cheap, local, for tools.

    Raises:
        CheckpointNotFound: an explicit path without the ``COMPLETE`` marker (also a FileNotFoundError).
        CheckpointError: (``verify`` only) an explicit path that fails verification, naming the file, or
            ``auto`` when every checkpoint fails (starting over would silently overwrite them).
    """
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        for path in reversed(found):
            problem = _verify_everywhere(path, report) if verify else None
            if problem is None:
                return path
            report(f"resume: skipping {path}: {problem}")
        if found:
            raise CheckpointError(f"train.resume=auto: no checkpoint under {root} verifies (see the lines above)")
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise CheckpointNotFound(f"train.resume: {path} is not a complete mmembed checkpoint (no {MARKER})")
    problem = _verify_everywhere(path, report) if verify else None
    if problem is not None:
        raise CheckpointError(f"train.resume: {problem}")
    return path


# ----------------------------------------------------------------------------------------------
# manifest and verification


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _payload_files(ckpt: Path) -> list[str]:
    """Every file of the checkpoint except the manifest and the marker, as sorted relative posix paths."""
    out = [p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(r for r in out if r not in (MANIFEST, MARKER))


def _write_manifest(ckpt: Path) -> None:
    """Hash the checkpoint's files (each rank a share, so large sharded checkpoints hash in parallel) and write
    ``MANIFEST.json`` atomically on rank 0. Collective."""
    rank, world = dist.get_rank(), dist.get_world_size()
    files = _payload_files(ckpt)
    mine = {rel: {"size": (ckpt / rel).stat().st_size, "sha256": _sha256(ckpt / rel)} for rel in files[rank::world]}
    entries: dict[str, Any] = {}
    for part in dist.all_gather_object(mine):
        entries.update(part)
    if rank == 0:
        tmp = ckpt / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"format": 1, "files": dict(sorted(entries.items()))}, indent=1) + "\n")
        os.replace(tmp, ckpt / MANIFEST)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def verify_checkpoint(ckpt: Path, rank: int = 0, world: int = 1) -> tuple[str | None, bool]:
    """Check share ``rank`` of ``world`` of the checkpoint's files; return (the first problem or None, legacy),
    where legacy means the checkpoint has no manifest and only its structure was checked."""
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    if not manifest.exists():
        return _verify_legacy(ckpt, rank, world), True
    try:
        entries = _read_json(manifest)["files"]
        if not isinstance(entries, dict):
            raise TypeError("'files' is not an object")
    except (CheckpointError, KeyError, TypeError) as e:
        return f"{manifest}: unreadable manifest ({e})", False
    extra = sorted(set(_payload_files(ckpt)) - set(entries))
    if extra:  # DeepSpeed and zero_to_fp32 glob for shards: an unlisted file could be loaded
        return f"{ckpt / extra[0]}: not listed in {MANIFEST}", False
    for rel in sorted(entries)[rank::world]:
        file, want = ckpt / rel, entries[rel]
        if not file.is_file():
            return f"{file}: missing (listed in {MANIFEST})", False
        size = file.stat().st_size
        if size != want.get("size"):
            return f"{file}: {size} bytes, {MANIFEST} says {want.get('size')} (truncated or replaced)", False
        if _sha256(file) != want.get("sha256"):
            return f"{file}: sha256 differs from {MANIFEST} (the file changed after it was written)", False
    return None, False


def _verify_legacy(ckpt: Path, rank: int, world: int) -> str | None:
    if rank == 0:
        try:
            if not isinstance(_read_json(ckpt / "trainer_state.json").get("step"), int):
                return f"{ckpt / 'trainer_state.json'}: no integer 'step'"
        except (CheckpointError, AttributeError) as e:
            return str(e)
    state = ckpt / TAG
    files = sorted(state.glob("*.pt")) if state.is_dir() else []
    if not files:
        return f"{state}: missing or holds no DeepSpeed state files"
    for file in files[rank::world]:
        try:
            if file.stat().st_size == 0:
                return f"{file}: empty file"
            with zipfile.ZipFile(file) as z:  # torch.save writes zip archives with a CRC per record
                bad = z.testzip()
            if bad is not None:
                return f"{file}: CRC mismatch in record {bad}"
        except (OSError, zipfile.BadZipFile) as e:
            return f"{file}: not a readable torch file ({e})"
    return None


def _verify_everywhere(ckpt: Path, report: Callable[[str], None]) -> str | None:
    """:func:`verify_checkpoint` with the work split over ranks; every rank gets the same answer."""
    result = verify_checkpoint(ckpt, dist.get_rank(), dist.get_world_size())
    results = dist.all_gather_object(result)
    problems = [p for p, _ in results if p is not None]
    if problems:
        return problems[0]
    if results[0][1]:
        report(f"resume: {ckpt} has no {MANIFEST} (written by an older mmembed): checked its structure only")
    return None


# ----------------------------------------------------------------------------------------------
# save, load, clean up


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _space_problem(root: Path, tmp: Path) -> str | None:
    """Refuse a save that cannot fit, judged by the size of the last checkpoint (none before the first save)."""
    found = list_checkpoints(root)
    if not found:
        return None
    needed = int(_tree_bytes(found[-1]) * SPACE_MARGIN)
    free = shutil.disk_usage(root).free
    if free >= needed:
        return None
    return (
        f"{tmp}: No space left on device: the checkpoint needs about {needed} bytes (the size of {found[-1].name}) "
        f"but {free} bytes are free under {root}; free some space or lower train.save_every. "
        f"The existing checkpoints are intact."
    )


def save_checkpoint(
    engine: Any,
    root: Path,
    step: int,
    state: dict[str, Any],
    skips: dict[str, Any],
    keep: int = 2,
    protect: Path | None = None,
) -> Path:
    """Write checkpoint ``step_<step>`` atomically (collective: call on every rank), then rotate: keep the
    newest ``keep`` complete checkpoints (``train.save_total_limit``; 0 keeps all), the one just written and
    ``protect`` (the checkpoint the run resumed from), see :func:`rotate_checkpoints`.

    Raises:
        CheckpointError: not enough free disk space for it (checked first), or writing failed (names the
            checkpoint path; the partial folder is removed and the older checkpoints are left as they were).
    """
    rank = dist.get_rank()
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    problem = dist.broadcast_object(_space_problem(root, tmp) if rank == 0 else None)  # all ranks stop together
    if problem:
        raise CheckpointError(problem)
    dist.barrier()
    error = None
    try:
        engine.save_checkpoint(str(tmp), tag=TAG, client_state={"mmembed": state}, save_latest=False)
        (tmp / f"skips_rank{rank}.json").write_text(json.dumps(skips))
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as "basic_ios::clear: iostream error"
        error = f"{type(e).__name__}: {e}"
    # the gather is also the barrier after every rank's write; a failure on one rank stops all of them together
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        raise CheckpointError(
            f"{tmp}: writing checkpoint step_{step} failed ({errors[0]}); {free} bytes free under {root}. "
            f"The existing checkpoints are intact."
        )
    _write_manifest(tmp)
    if rank == 0:
        (tmp / MARKER).write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        rotate_checkpoints(root, keep, protect=[final] + ([protect] if protect is not None else []))
    dist.barrier()
    return final


def rotate_checkpoints(root: Path, keep: int, protect: list[Path] | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints under ``root`` (by step; ``keep=0`` keeps all);
    never one in ``protect``. Rank 0 only; returns what was removed.

    Each one is first renamed to ``.tmp-step_<N>.deleting`` (a name :func:`list_checkpoints` never returns and
    :func:`clean_stale_temporaries` removes), so a kill during the deletion cannot leave a folder that still
    carries ``COMPLETE`` but misses files.
    """
    if keep <= 0:
        return []
    kept = {Path(p).resolve() for p in protect or []}
    removed = []
    for old in list_checkpoints(root)[:-keep]:
        if old.resolve() in kept:
            continue
        doomed = old.with_name(f".tmp-{old.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    return removed


def load_checkpoint(engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the engine from ``path``; return the run state and this rank's skip counter.

    Raises:
        CheckpointError: unreadable ``trainer_state.json``, a DeepSpeed file that cannot be read or needs
            more than the weights-only allow-list (:class:`UnsafeCheckpointError`), or no engine state.
    """
    path = Path(path)
    state = _read_json(path / "trainer_state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'trainer_state.json'}: no integer 'step'")
    skips_file = path / f"skips_rank{dist.get_rank()}.json"
    skips = _read_json(skips_file) if skips_file.is_file() else {}
    with restricted_torch_load():
        _, client = engine.load_checkpoint(
            str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if client is None:
        raise CheckpointError(f"{path / TAG}: DeepSpeed found no engine state to load")
    return state, skips


def clean_stale_temporaries(output_dir: Path) -> list[Path]:
    """Remove what a killed run leaves behind (``.final.tmp-*``, ``.best.tmp-*`` from the model export,
    ``checkpoints/.tmp-step_*`` from a checkpoint save or rotation). Call on rank 0 before anything is written.

    ``.final.old-*`` folders are kept on purpose: a kill between the two renames of an export leaves the
    previous model only there.
    """
    output_dir = Path(output_dir)
    stale = [*output_dir.glob(".final.tmp-*"), *output_dir.glob(".best.tmp-*")]
    stale += list((output_dir / "checkpoints").glob(".tmp-step_*"))
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale

"""Dataset manifests: which files, in which format, with which weight, cap and instructions.

``data.train`` / ``data.eval`` may be a manifest YAML, a directory of MMEB parquet/JSONL files (one
dataset per file, named by the file stem) or a single file. A manifest looks like::

    datasets:
      - name: ImageNet_1K                # default: the file stem
        path: train/ImageNet_1K.parquet  # a file or a directory of files; relative to the manifest
        format: mmeb_train               # default: detected from the columns
        image_root: images/              # default: data.image_root, else the data file's folder
        weight: 1.0                      # default: proportional to the (capped) number of rows
        cap: 50000                       # use at most the first N rows
        query_instruction: "Represent the given image for classification."   # or a list
        target_instruction: null
        inline_instruction: null         # prefix(es) to strip from MMEB qry when instructions are set
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.data.instructions import Instructions
from mmembed.data.sources import DATA_SUFFIXES

__all__ = ["DatasetSpec", "resolve_datasets", "load_manifest", "MANIFEST_KEYS"]

MANIFEST_KEYS = (
    "name",
    "path",
    "format",
    "image_root",
    "weight",
    "cap",
    "query_instruction",
    "target_instruction",
    "inline_instruction",
)


@dataclass
class DatasetSpec:
    """One dataset of a mixture (resolved paths)."""

    name: str
    files: list[Path]
    format: str | None = None
    image_root: Path | None = None  # None: each data file's own folder
    weight: float | None = None
    cap: int | None = None
    instructions: Instructions = field(default_factory=Instructions)


def _files_in(path: Path, where: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{where}: no {'/'.join(DATA_SUFFIXES)} files in directory {path}")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{where}: {path} does not exist")


def load_manifest(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[DatasetSpec]:
    """Read a manifest YAML into dataset specs; every error names the manifest and the entry."""
    from omegaconf import OmegaConf

    path = Path(path)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'datasets' list")
    unknown_top = set(raw) - {"datasets", "description"}
    if unknown_top:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown_top)}; allowed: datasets, description")
    specs, names = [], set()
    for k, entry in enumerate(raw["datasets"]):
        where = f"{path}: datasets[{k}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
        for key in entry:
            if key not in MANIFEST_KEYS:
                close = difflib.get_close_matches(str(key), MANIFEST_KEYS, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"{where}: unknown key '{key}'.{hint} Allowed: {', '.join(MANIFEST_KEYS)}")
        if "path" not in entry:
            raise ValueError(f"{where}: 'path' is required")
        files = _files_in(path.parent / str(entry["path"]), where)
        name = str(entry.get("name") or (files[0].stem if len(files) == 1 else Path(str(entry["path"])).name))
        if name in names:
            raise ValueError(f"{where}: duplicate dataset name '{name}'")
        names.add(name)
        weight, cap = entry.get("weight"), entry.get("cap")
        if weight is not None and (not isinstance(weight, (int, float)) or weight < 0):
            raise ValueError(f"{where}.weight: expected a number >= 0, got {weight!r}")
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{where}.cap: expected an integer >= 1, got {cap!r}")
        root = entry.get("image_root")
        specs.append(
            DatasetSpec(
                name=name,
                files=files,
                format=entry.get("format"),
                image_root=(path.parent / root) if root else (Path(image_root) if image_root else None),
                weight=None if weight is None else float(weight),
                cap=cap,
                instructions=Instructions.from_manifest(entry, where),
            )
        )
    return specs


def resolve_datasets(spec: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[DatasetSpec]:
    """``data.train``/``data.eval`` -> dataset specs (manifest YAML, directory or single file)."""
    p = Path(spec)
    root = Path(image_root) if image_root else None
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: manifest not found")
        return load_manifest(p, image_root)
    files = _files_in(p, "data")
    return [DatasetSpec(name=f.stem, files=[f], image_root=root) for f in files]


def manifest_entry(spec: DatasetSpec) -> dict[str, Any]:
    """The manifest entry of a spec (for writing manifests programmatically)."""
    out: dict[str, Any] = {"name": spec.name, "path": str(spec.files[0])}
    if spec.weight is not None:
        out["weight"] = spec.weight
    if spec.cap is not None:
        out["cap"] = spec.cap
    return out

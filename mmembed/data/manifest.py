"""Dataset manifests and the MMEB download layout: which files, format, weight, cap and instructions.

``data.train`` / ``data.eval`` may be a manifest YAML, a directory or a single file (docs/mmeb_parsing.md, "Layout"):

- a folder of subset folders, as the Hugging Face downloads of MMEB are laid out
  (``MMEB-eval/ImageNet-1K/test-00000-of-00001.parquet``; ``MMEB-train/ImageNet_1K/original-00000-of-00001.parquet``
  beside ``diverse_instruction-00000-of-00001.parquet``; or the parquet converter's ``<subset>/<split>/0000.parquet``):
  one dataset per subset folder, named by the folder, so its meta-task and IND/OOD split follow from the name
  (:func:`mmembed.eval.tasks.task_info`);
- one subset folder: that dataset;
- a folder of data files: one dataset per file, named by the file stem; a file named like a split shard
  (``test-00000-of-00001.parquet``) is named by its folder.

A subset with several splits reads one: ``original`` (VLM2Vec's default ``split_name``, the paper's data), else
``train``, else ``test``, else its only one; a manifest entry's ``split`` picks another. ``diverse_instruction`` is
the subset's rows with paraphrased instructions: VLM2Vec trains on it *instead of* ``original`` when asked (v1
``src/dataset.py`` ``TrainTextImageDataset``: ``load_dataset(name, subset, split=split_name)``; V2
``mmeb_dataset.py`` ``dataset_split``), never on both; it is kept as ``DatasetSpec.paraphrases``, not read as a
dataset of its own.

Images: ``image_root`` (the manifest entry's, else ``data.image_root`` / ``--image-root``), else an ``images/`` or
``eval_images/`` folder beside the data (in its folder or the one above) when there is one; whether the rows' paths
are relative to that folder or to the folder holding it (``images/...`` paths) is decided by where the first image
named in the rows exists. Else each data file's own folder.

A manifest looks like::

    datasets:
      - name: ImageNet_1K                # default: the subset folder or the file stem
        path: train/ImageNet_1K.parquet  # file, subset folder, folder of files or of subsets; relative to the manifest
        format: mmeb_train               # default: detected from the columns
        image_root: images/              # default: see above
        weight: 1.0                      # default: proportional to the (capped) number of rows
        cap: 50000                       # each dataset: the first N rows (VLM2Vec's num_sample_per_subset)
        split: diverse_instruction       # the split of a subset folder
        subsets: [ImageNet_1K, N24News]  # of a folder of subsets: only these
        family: image_cls                # eval: VLM2Vec-V2 parser family (default: from the name; mmeb_rules)
        query_instruction: "Represent the given image for classification."   # or a list
        target_instruction: null
        inline_instruction: null         # prefix(es) to strip from MMEB qry when instructions are set
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from mmembed.data.instructions import Instructions
from mmembed.data.mmeb_rules import FAMILIES
from mmembed.data.sources import DATA_SUFFIXES

__all__ = ["DatasetSpec", "resolve_datasets", "load_manifest", "MANIFEST_KEYS", "find_image_dir", "subset_splits"]

MANIFEST_KEYS = (
    "name",
    "path",
    "format",
    "image_root",
    "weight",
    "cap",
    "split",
    "subsets",
    "family",
    "query_instruction",
    "target_instruction",
    "inline_instruction",
)
SPLIT_PREFERENCE = ("original", "train", "test")
PARAPHRASE_SPLIT = "diverse_instruction"
IMAGE_DIRS = ("images", "eval_images")
_SHARD = re.compile(r"^(?P<split>[A-Za-z][A-Za-z0-9_.]*)-\d{5}-of-\d{5}$")  # HF hub: original-00000-of-00001
_CONVERTED = re.compile(r"^\d+$")  # HF parquet converter: <subset>/<split>/0000.parquet
_IMAGE_FIELDS = ("qry_image_path", "pos_image_path", "neg_image_path", "qry_img_path", "tgt_img_path")


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
    family: str | None = None  # eval parser family; None: from the name (mmembed.data.mmeb_rules)
    split: str | None = None  # the split read, for a subset folder
    splits: dict[str, list[Path]] = field(default_factory=dict)  # every split the subset folder holds

    @property
    def paraphrases(self) -> list[Path]:
        """The subset's ``diverse_instruction`` files (its rows with paraphrased instructions), if any."""
        return [] if self.split == PARAPHRASE_SPLIT else self.splits.get(PARAPHRASE_SPLIT, [])


# ----------------------------------------------------------------------------------------------
# Layout


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())


def _split_of(path: Path) -> str | None:
    m = _SHARD.match(path.stem)
    return m.group("split") if m else None


def subset_splits(folder: Path) -> dict[str, list[Path]]:
    """``{split: files}`` of an MMEB subset folder; ``{}`` when ``folder`` is not one.

    A subset folder holds split shards (``original-00000-of-00001.parquet``) or split folders of converter
    files (``test/0000.parquet``).
    """
    files = _data_files(folder)
    out: dict[str, list[Path]] = {}
    if files:
        if all(_split_of(f) for f in files):
            for f in files:
                out.setdefault(str(_split_of(f)), []).append(f)
        return out
    for d in sorted(x for x in folder.iterdir() if x.is_dir()):
        fs = _data_files(d)
        if fs and all(_CONVERTED.match(f.stem) for f in fs):
            out[d.name] = fs
    return out


def _choose(splits: dict[str, list[Path]], split: str | None, folder: Path, where: str) -> str:
    if split:
        if split not in splits:
            raise FileNotFoundError(f"{where}: {folder} has no split '{split}' (found: {', '.join(splits)})")
        return split
    if len(splits) == 1:
        return next(iter(splits))
    for s in SPLIT_PREFERENCE:
        if s in splits:
            return s
    raise ValueError(f"{where}: {folder} holds the splits {', '.join(splits)}; pick one with a manifest 'split:'")


_Found = tuple[str, list[Path], str | None, dict[str, list[Path]]]  # name, files, split, all splits


def _expand(path: Path, where: str, split: str | None = None, subsets: list[str] | None = None) -> list[_Found]:
    """A data path -> its datasets (see the module doc); errors name ``where`` and what was expected."""
    if path.is_file():
        if subsets:
            raise ValueError(f"{where}: 'subsets' needs a folder of subset folders, {path} is a file")
        s = _split_of(path)
        if split and s != split:
            raise ValueError(f"{where}: {path} is not a file of split '{split}'")
        return [(path.parent.name if s else path.stem, [path], s, {})]
    if not path.is_dir():
        raise FileNotFoundError(f"{where}: {path} does not exist")
    own = subset_splits(path)
    files = _data_files(path)
    if own or files:
        if subsets:
            raise ValueError(f"{where}: 'subsets' needs a folder of subset folders; {path} holds data files")
        if own:
            chosen = _choose(own, split, path, where)
            return [(path.name, own[chosen], chosen, own)]
        if split:
            raise ValueError(f"{where}: {path} has no split files (NAME-00000-of-00001.parquet); drop 'split'")
        return [(f.stem, [f], None, {}) for f in files]
    found: list[_Found] = []
    for d in sorted(x for x in path.iterdir() if x.is_dir() and x.name not in IMAGE_DIRS and x.name[0] != "."):
        sub = subset_splits(d)
        if sub:
            chosen = _choose(sub, split, d, where)
            found.append((d.name, sub[chosen], chosen, sub))
        elif fs := _data_files(d):
            if split:
                raise ValueError(f"{where}: subset folder {d} has no split files, so no split '{split}'")
            found.append((d.name, fs, None, {}))
    if not found:
        raise FileNotFoundError(
            f"{where}: no {'/'.join(DATA_SUFFIXES)} files in directory {path} or in its subset folders"
        )
    if subsets:
        names = {f[0] for f in found}
        missing = [s for s in subsets if s not in names]
        if missing:
            raise FileNotFoundError(
                f"{where}: no subset folder {', '.join(missing)} in {path} (found: {sorted(names)})"
            )
        found = [f for f in found if f[0] in subsets]
    return found


# ----------------------------------------------------------------------------------------------
# Image root


def find_image_dir(data: str | os.PathLike) -> Path | None:
    """An ``images/`` or ``eval_images/`` folder beside ``data`` (its folder, then the one above), or None."""
    data = Path(data)
    base = data if data.is_dir() else data.parent
    for d in (base, base.parent):
        for name in IMAGE_DIRS:
            if (d / name).is_dir():
                return d / name
    return None


def _image_values(row: Any) -> list[str]:
    if not isinstance(row, dict):
        return []
    out: list[Any] = []
    for key in _IMAGE_FIELDS:
        v = row.get(key)
        out += v if isinstance(v, list) else [v]
    for side in [row.get("query"), row.get("positive"), *(row.get("negatives") or [])]:
        if isinstance(side, dict):
            v = side.get("images")
            out += [side.get("image"), *(v if isinstance(v, list) else [])]
    return [v for v in out if isinstance(v, str) and v and not Path(v).is_absolute()]


def _first_image(path: Path, rows: int = 64) -> str | None:
    """The first relative image path named in the first ``rows`` rows of a data file (None: none, or unreadable)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            cols = [c for c in _IMAGE_FIELDS if c in pf.schema_arrow.names]
            if not cols or not pf.num_row_groups:
                return None
            items = pf.read_row_group(0, columns=cols).slice(0, rows).to_pylist()
        else:
            with open(path, encoding="utf-8") as f:
                items = [json.loads(line) for line in islice(f, rows) if line.strip()]
    except Exception:  # noqa: BLE001 - the reader reports a broken file with its row; here it only decides nothing
        return None
    for row in items:
        values = _image_values(row)
        if values:
            return values[0]
    return None


def _default_root(files: list[Path], image_dir: Path | None) -> Path | None:
    """``image_dir`` or its parent, whichever holds the rows' first image; None (each file's folder) when that does."""
    if image_dir is None or not files:
        return None
    rel = _first_image(files[0])
    if rel is None:
        return None  # nothing to decide on: keep each file's own folder
    for root in (image_dir, image_dir.parent):
        if (root / rel).exists():
            return None if root.resolve() == files[0].parent.resolve() else root
    return None if (files[0].parent / rel).exists() else image_dir


# ----------------------------------------------------------------------------------------------
# Manifests


def _check_entry(entry: dict[str, Any], where: str) -> None:
    for key in entry:
        if key not in MANIFEST_KEYS:
            close = difflib.get_close_matches(str(key), MANIFEST_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{where}: unknown key '{key}'.{hint} Allowed: {', '.join(MANIFEST_KEYS)}")
    if "path" not in entry:
        raise ValueError(f"{where}: 'path' is required")
    weight, cap = entry.get("weight"), entry.get("cap")
    if weight is not None and (not isinstance(weight, (int, float)) or weight < 0):
        raise ValueError(f"{where}.weight: expected a number >= 0, got {weight!r}")
    if cap is not None and (not isinstance(cap, int) or cap < 1):
        raise ValueError(f"{where}.cap: expected an integer >= 1, got {cap!r}")
    if entry.get("split") is not None and not isinstance(entry["split"], str):
        raise ValueError(f"{where}.split: expected a split name such as 'diverse_instruction', got {entry['split']!r}")
    subsets = entry.get("subsets")
    if subsets is not None and (not isinstance(subsets, list) or not all(isinstance(s, str) for s in subsets)):
        raise ValueError(f"{where}.subsets: expected a list of subset folder names, got {subsets!r}")
    if entry.get("family") is not None and entry["family"] not in FAMILIES:
        raise ValueError(f"{where}.family: expected one of {', '.join(FAMILIES)}, got {entry['family']!r}")


def _entry_datasets(data: Path, entry: dict[str, Any], where: str) -> list[_Found]:
    """A manifest entry's datasets: a folder of plain data files stays one dataset (its files concatenated)."""
    if data.is_dir() and not subset_splits(data) and (files := _data_files(data)):
        if entry.get("split") or entry.get("subsets"):
            raise ValueError(f"{where}: {data} holds plain data files, not subset or split files; drop split/subsets")
        return [(files[0].stem if len(files) == 1 else data.name, files, None, {})]
    return _expand(data, where, entry.get("split"), entry.get("subsets"))


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
        _check_entry(entry, where)
        data = path.parent / str(entry["path"])
        found = _entry_datasets(data, entry, where)
        if entry.get("name") and len(found) > 1:
            raise ValueError(f"{where}: 'name' names one dataset, but {data} holds {len(found)} subsets")
        root = entry.get("image_root")
        fixed = (path.parent / root) if root else (Path(image_root) if image_root else None)
        image_dir = None if fixed else find_image_dir(data)
        for name, files, split, splits in found:
            name = str(entry.get("name") or name)
            if name in names:
                raise ValueError(f"{where}: duplicate dataset name '{name}'")
            names.add(name)
            specs.append(
                DatasetSpec(
                    name=name,
                    files=files,
                    format=entry.get("format"),
                    image_root=fixed or _default_root(files, image_dir),
                    weight=None if entry.get("weight") is None else float(entry["weight"]),
                    cap=entry.get("cap"),
                    instructions=Instructions.from_manifest(entry, where),
                    family=entry.get("family"),
                    split=split,
                    splits=splits,
                )
            )
    return specs


def resolve_datasets(spec: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[DatasetSpec]:
    """``data.train``/``data.eval`` -> dataset specs (a manifest YAML, a folder of subsets or of files, a file)."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: manifest not found")
        return load_manifest(p, image_root)
    image_dir = None if image_root else find_image_dir(p)
    return [
        DatasetSpec(
            name=name,
            files=files,
            image_root=Path(image_root) if image_root else _default_root(files, image_dir),
            split=split,
            splits=splits,
        )
        for name, files, split, splits in _expand(p, "data")
    ]


def manifest_entry(spec: DatasetSpec) -> dict[str, Any]:
    """The manifest entry of a spec (for writing manifests programmatically)."""
    out: dict[str, Any] = {"name": spec.name, "path": str(spec.files[0])}
    if spec.weight is not None:
        out["weight"] = spec.weight
    if spec.cap is not None:
        out["cap"] = spec.cap
    return out

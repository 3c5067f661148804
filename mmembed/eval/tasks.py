"""MMEB-V1 task table: dataset -> meta-task and IND/OOD split (docs/mmeb.md §1.4-1.5).

MMEB-V1 (Jiang et al., "VLM2Vec", arXiv 2410.05160, Table 1) has 36 datasets in 4 meta-tasks
(classification 10, VQA 10, retrieval 12, visual grounding 4). The 20 datasets of MMEB-train are
in-distribution (IND), the other 16 out-of-distribution (OOD). Names are the subset folder names of
``TIGER-Lab/MMEB-eval`` (``ImageNet-1K/test-00000-of-00001.parquet``), which is how a download read as it is
names its datasets (:mod:`mmembed.data.manifest`); lookups ignore case and treat ``_``/``-`` alike, so the
training name ``ImageNet_1K`` finds ``ImageNet-1K``. VLM2Vec-V2's parser for each of them is in
:mod:`mmembed.data.mmeb_rules`.

Other datasets get their meta-task from a ``meta.json`` (the demo set's format, written by
:mod:`mmembed.data.synthetic`: ``{"tasks": {NAME: {"meta_task": "CLS", "split"?: "IND"}}}``) found
beside the data or one folder above it, or from an explicit mapping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MMEB_V1", "META_TASKS", "TaskInfo", "task_info", "read_task_meta"]

META_TASKS = ("CLS", "VQA", "RET", "VG")

_IND = {
    "CLS": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"),
    "VQA": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"),
    "RET": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA"),
    "VG": ("MSCOCO",),
}
_OOD = {
    "CLS": ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"),
    "VQA": ("ScienceQA", "VizWiz", "GQA", "TextVQA"),
    "RET": ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    "VG": ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
#: name -> (meta-task, "IND" | "OOD") for the 36 MMEB-V1 datasets.
MMEB_V1: dict[str, tuple[str, str]] = {
    **{n: (mt, "IND") for mt, names in _IND.items() for n in names},
    **{n: (mt, "OOD") for mt, names in _OOD.items() for n in names},
}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


_BY_NORM = {_norm(n): (n, *v) for n, v in MMEB_V1.items()}


class TaskInfo(dict):
    """``{"meta_task": str | None, "split": "IND" | "OOD" | None, "mmeb": bool}`` for one dataset."""


def task_info(name: str, extra: dict[str, dict[str, Any]] | None = None) -> TaskInfo:
    """Meta-task and split of dataset ``name``: ``extra`` (meta.json tasks) first, then MMEB-V1."""
    if extra and name in extra:
        e = extra[name]
        return TaskInfo(meta_task=e.get("meta_task"), split=e.get("split"), mmeb=False)
    hit = _BY_NORM.get(_norm(name))
    if hit:
        return TaskInfo(meta_task=hit[1], split=hit[2], mmeb=True)
    return TaskInfo(meta_task=None, split=None, mmeb=False)


def read_task_meta(data: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ``tasks`` table of a ``meta.json`` beside ``data`` (a file or folder) or one or two folders up."""
    p = Path(data).resolve()
    folder = p if p.is_dir() else p.parent
    for d in (folder, folder.parent, folder.parent.parent):
        f = d / "meta.json"
        if f.is_file():
            try:
                tasks = json.loads(f.read_text()).get("tasks", {})
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{f}: not a valid meta.json ({e})") from None
            if isinstance(tasks, dict):
                return {str(k): dict(v) for k, v in tasks.items() if isinstance(v, dict)}
    return {}

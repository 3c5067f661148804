"""Checks that an evaluation scores what it should: images that are missing or unreadable.

MMEB's rule (docs/mmeb.md §1.5): a row whose image is missing is a miss and stays in the denominator, so a few
missing files lower the score a little and are reported. But when *every* row that has an image has a missing
(or unreadable) one, nothing of the dataset's images was scored: the usual cause is a forgotten ``--image-root``,
and the honest answer is an error, not a score of 0.0 (or the chance level).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmembed.data.eval_table import EvalRows
from mmembed.data.formats import EvalExample
from mmembed.eval.plan import Plan

__all__ = ["MissingImages", "count_missing", "check_missing", "check_unreadable", "first_missing_path"]


class MissingImages(ValueError):
    """Every row of an eval set that has an image has a missing or unreadable one (nothing would be scored)."""


def _sides(ex: EvalExample) -> list[tuple[str, object]]:
    return [("query", ex.query)] + [(f"candidate {j}", c) for j, c in enumerate(ex.candidates)]


def _has_image(ex: EvalExample) -> bool:
    return bool(ex.query.images) or any(c.images for c in ex.candidates)


def _file_problem(im: object) -> str | None:
    """Why the image reference ``im`` cannot be read from disk (the reader's rule: absent or empty), else None."""
    if not isinstance(im, (str, os.PathLike)):
        return None
    p = Path(im)
    if not p.is_file():
        return "file not found"
    if p.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


def first_missing_path(ex: EvalExample) -> str:
    """The first missing image file of a row marked by the reader (``meta["missing_images"]``), with its side."""
    marks = set(ex.meta.get("missing_images") or ())
    for label, side in _sides(ex):
        if label not in marks:
            continue
        for im in side.images:  # type: ignore[attr-defined]
            why = _file_problem(im)
            if why:
                return f"{im} ({label}: {why})"
        return f"({label})"
    return ""


def missing_paths(ex: EvalExample) -> list[str]:
    """Every missing image file of a row marked by the reader, for display."""
    marks = set(ex.meta.get("missing_images") or ())
    out = []
    for label, side in _sides(ex):
        if label in marks:
            out += [str(im) for im in side.images if _file_problem(im)]  # type: ignore[attr-defined]
    return out


def count_missing(examples: Sequence[EvalExample]) -> tuple[int, int, str]:
    """``(rows with a missing image, rows with any image, first missing path)``; cheap when nothing is missing.

    On an :class:`~mmembed.data.eval_table.EvalRows` table it reads the (N) row metas and the (K) inputs, never
    building the rows' examples."""
    if isinstance(examples, EvalRows):
        rows = [r for r, meta in enumerate(examples.metas) if meta.get("missing_images")]
        if not rows:
            return 0, -1, ""
        side_img = np.fromiter((bool(s.images) for s in examples.sides), dtype=bool, count=len(examples.sides))
        return len(rows), int(examples.rows_using(side_img).sum()), first_missing_path(examples[rows[0]])
    missing = [ex for ex in examples if ex.meta.get("missing_images")]
    if not missing:
        return 0, -1, ""  # -1: not counted (not needed)
    with_images = sum(1 for ex in examples if _has_image(ex))
    return len(missing), with_images, first_missing_path(missing[0])


_HINT = (
    "nothing would be scored (such rows are misses, the score would be meaningless); image paths are resolved "
    "against an images/ folder beside the data or the data file's folder unless --image-root DIR is given: "
    "is --image-root missing or wrong?"
)


def check_missing(name: str, examples: Sequence[EvalExample]) -> str | None:
    """Before encoding: raise :class:`MissingImages` when every image row misses its image, else a warning or None.

    The warning line names the count and the first missing path; those rows stay misses in the denominator.
    """
    n_missing, n_images, first = count_missing(examples)
    if not n_missing:
        return None
    if n_missing >= n_images:
        raise MissingImages(
            f"eval set '{name}': all {n_images} row(s) with an image have a missing image file "
            f"(first: {first}); {_HINT}"
        )
    return (
        f"warning: eval set '{name}': {n_missing} of {len(examples)} row(s) have a missing image file, "
        f"scored as misses (MMEB rule, kept in the denominator); first: {first}"
    )


def check_unreadable(name: str, plan: Plan) -> None:
    """After encoding: raise :class:`MissingImages` when every image row has a missing or unreadable image."""
    if plan.unreadable_rows is None or not plan.unreadable_rows.any():
        return
    side_img = np.array([bool(s.images) for s in plan.sides], dtype=bool)
    rows_img = plan.rows_using(side_img)
    n_images = int(rows_img.sum())
    if n_images and bool(plan.missing_rows[rows_img].all()):
        n_bad = int(plan.unreadable_rows.sum())
        raise MissingImages(
            f"eval set '{name}': all {n_images} row(s) with an image have a missing or unreadable image "
            f"({n_images - n_bad} missing, {n_bad} unreadable; first unreadable: {plan.unreadable_example}); {_HINT}"
        )

"""The rows of ``mmembed encode`` / ``mmembed index build`` input files (JSONL), and the CLI's input error.

One row per non-blank line: ``{"text", "image", "instruction", "id"}``, every field optional but ``text`` or
``image`` needed; errors name ``file:LINE`` and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "EncodeRows", "read_encode_rows", "read_rows"]

_ROW_FIELDS = ("text", "image", "instruction", "id")


class UsageError(ValueError):
    """Bad command-line input: printed without a traceback, exit code 2."""


@dataclass
class EncodeRows:
    """The rows of an ``mmembed encode`` JSONL, aligned lists (one item per non-blank line).

    ``images`` items are ``None``, one path, or a list of paths (several images in one input), resolved against
    the file's folder; ``ids`` are the rows' ``id`` values (default: the 1-based line number); ``lines`` the
    1-based line of each row, for error messages.
    """

    path: Path
    texts: list[str | None] = field(default_factory=list)
    images: list[str | list[str] | None] = field(default_factory=list)
    instructions: list[str | None] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, i: int) -> str:
        """``file:LINE`` of row ``i`` (0-based index into the lists)."""
        return f"{self.path}:{self.lines[i]}"


def _image_field(value: Any, where: str, folder: Path) -> str | list[str] | None:
    """``image``: a path or a list of paths; relative paths resolve against ``folder``."""

    def resolve(p: str) -> str:
        return p if Path(p).is_absolute() else str(folder / p)

    if value is None or isinstance(value, str):
        return None if value is None else resolve(value)
    if isinstance(value, list):
        for j, item in enumerate(value):
            if not isinstance(item, str):
                raise UsageError(f"{where}: field 'image[{j}]' must be a string path, got {type(item).__name__}")
        return [resolve(p) for p in value] or None
    raise UsageError(f"{where}: field 'image' must be a string or a list of strings, got {type(value).__name__}")


def read_encode_rows(path: str | Path) -> EncodeRows:
    """Read a JSONL of ``{"text", "image", "instruction", "id"}`` rows (all optional, ``text`` or ``image`` needed).

    ``image`` is a path or a list of paths, relative to the file's folder; ``id`` any JSON scalar (default: the
    row's 1-based line number), unique in the file. Blank lines are skipped but counted.

    Raises:
        UsageError: naming ``file:LINE`` (1-based) and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: input file not found")
    rows = EncodeRows(path)
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{where}: expected a JSON object with 'text' and/or 'image'")
            unknown = set(row) - set(_ROW_FIELDS)
            if unknown:
                raise UsageError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(_ROW_FIELDS)}")
            text, instr = row.get("text"), row.get("instruction")
            for key, value in (("text", text), ("instruction", instr)):
                if value is not None and not isinstance(value, str):
                    raise UsageError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
            image = _image_field(row.get("image"), where, path.parent)
            if text is None and image is None:
                raise UsageError(f"{where}: a row needs 'text' or 'image'")
            row_id = row.get("id")
            if row_id is None:
                row_id = n
            elif not isinstance(row_id, (str, int, float, bool)):
                raise UsageError(
                    f"{where}: field 'id' must be a JSON scalar (string, number), got {type(row_id).__name__}"
                )
            key = json.dumps(row_id)
            if key in seen:
                raise UsageError(f"{where}: duplicate id {key} (also on line {seen[key]})")
            seen[key] = n
            rows.texts.append(text)
            rows.images.append(image)
            rows.instructions.append(instr)
            rows.ids.append(row_id)
            rows.lines.append(n)
    return rows


def read_rows(path: str | Path) -> tuple[list[str | None], list[Any], list[str | None]]:
    """``(texts, images, instructions)`` of an encode JSONL (see :func:`read_encode_rows`, which also has ids)."""
    rows = read_encode_rows(path)
    return rows.texts, rows.images, rows.instructions


_ROW_ERROR = re.compile(r"^row (\d+): (.*)$", re.DOTALL)


def _locate(err: Exception, rows: EncodeRows, offset: int) -> UsageError:
    """A model error naming ``row i`` of one encode call, renamed to ``file:LINE`` of the input."""
    text = str(err)
    m = _ROW_ERROR.match(text)
    if m and 0 <= offset + int(m.group(1)) < len(rows):
        return UsageError(f"{rows.where(offset + int(m.group(1)))}: {m.group(2)}")
    return UsageError(f"{rows.path}: {text}")

"""Shared helpers for the data tests: tiny images written to tmp_path and a fake processor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from mmembed.data.sample import Side
from mmembed.images import ImageTransform


def make_image(path: Path, color: tuple[int, int, int] = (200, 10, 10), size: int = 16, mode: str = "RGB") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).convert(mode).save(path)
    return str(path)


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(rows: list[Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def train_row(i: int, image: str | None = None, neg: bool = True) -> dict[str, Any]:
    return {
        "qry": f"<|image_1|> Represent the given image for classification. item {i}",
        "qry_image_path": image or f"images/{i}.png",
        "pos_text": f"label {i}",
        "pos_image_path": "",
        "neg_text": f"wrong {i}" if neg else "",
        "neg_image_path": "",
    }


def make_train_set(root: Path, n: int, name: str = "ds.parquet", start: int = 0) -> Path:
    """n MMEB-train rows with one small image each (distinct colors), under ``root``."""
    for i in range(start, start + n):
        make_image(root / "images" / f"{i}.png", (i * 37 % 256, i * 11 % 256, 90))
    return write_parquet([train_row(i) for i in range(start, start + n)], root / name)


class FakeProcessor:
    """The processor interface: ``placeholder``, ``__call__(sides)`` padding to the longest, ``length``."""

    placeholder = "<image>"

    def __init__(self) -> None:
        self.transform = ImageTransform(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def tokens(self, side: Side) -> list[int]:
        text = (side.instruction or "") + " " + (side.text or "")
        ids = [ord(c) % 97 + 3 for c in text]
        return [2] * (4 * len(side.images)) + ids  # 4 "visual tokens" per image

    def length(self, side: Side) -> int:
        return len(self.tokens(side))

    def __call__(self, sides: list[Side]) -> dict[str, torch.Tensor]:
        seqs = [self.tokens(s) for s in sides]
        n = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        images = [im for s in sides for im in s.images]
        for im in images:
            assert isinstance(im, Image.Image), f"images must be decoded before the processor, got {type(im)}"
        pix = torch.stack([self.transform(im) for im in images]) if images else torch.zeros(0, 3, 8, 8)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}


def pixel_sum(img: Image.Image) -> int:
    return int(np.asarray(img, dtype=np.int64).sum())

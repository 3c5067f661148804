"""Hand-made eval sets and fake models whose right answers are known."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tests.conftest import make_image


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def known_set(folder: Path, n: int = 6, k: int = 4, name: str = "known", images: bool = True) -> Path:
    """Query i (text ``item i`` + image i) has positive ``label i`` and k-1 other labels as candidates.

    Candidates are shared between rows (the label set of a classification task), positive first.
    """
    if images:
        (folder / "img").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_image(i).save(folder / "img" / f"{i}.png")
    rows = []
    for i in range(n):
        others = [(i + j) % n for j in range(1, k)]
        rows.append(
            {
                "qry_text": f"<|image_1|> item {i}" if images else f"item {i}",
                "qry_img_path": f"img/{i}.png" if images else "",
                "tgt_text": [f"label {c}" for c in [i, *others]],
                "tgt_img_path": [""] * k,
            }
        )
    return write_jsonl(rows, folder / f"{name}.jsonl")


def _ident(text: str | None) -> int:
    m = re.search(r"(\d+)\s*$", text or "")
    return int(m.group(1)) if m else -1


class OracleModel:
    """Embeds ``... item i`` and ``label i`` to the same one-hot vector: every query is a hit."""

    embed_dim = 32

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, texts=None, images=None, instruction=None, batch_size=32, show_progress_bar=None, **kw):
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        for r, t in enumerate(texts):
            out[r, _ident(t) % self.embed_dim] = 1.0
        return out


class ConstantModel(OracleModel):
    """The same unit vector for every input: scores must be exactly the chance level."""

    def encode(self, texts=None, images=None, instruction=None, batch_size=32, show_progress_bar=None, **kw):
        self.calls.append(len(texts))
        return np.full((len(texts), self.embed_dim), 1.0 / np.sqrt(self.embed_dim), dtype=np.float32)


def t2i_set(folder: Path, n: int = 6, k: int = 3, name: str = "t2i") -> Path:
    """Text query ``caption i`` ranked against images (candidates with an image only), positive first."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(100 + i).save(folder / "img" / f"c{i}.png")
    rows = []
    for i in range(n):
        cands = [i, *[(i + j) % n for j in range(1, k)]]
        rows.append(
            {
                "qry_inst": "Find me an everyday image that matches the given caption:",
                "qry_text": f"caption {i}",
                "qry_img_path": "",
                "tgt_inst": "Represent the given image.",
                "tgt_text": ["<|image_1|>"] * k,
                "tgt_img_path": [f"img/c{c}.png" for c in cands],
            }
        )
    return write_jsonl(rows, folder / f"{name}.jsonl")


def scores_without_run_info(path: Path) -> dict:
    """The numbers of a scores.json (datasets, means), without timing, date and encode counts."""
    from mmembed.eval.protocol import RUN_INFO

    s = json.loads(path.read_text())
    out = {k: s[k] for k in ("datasets", "meta_tasks", "splits", "overall", "means")}
    out["datasets"] = {n: {k: v for k, v in d.items() if k not in RUN_INFO} for n, d in out["datasets"].items()}
    return out

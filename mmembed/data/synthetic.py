"""Built-in demo data: rendered shape scenes in MMEB train/eval format, offline and deterministic.

``python -m mmembed.data.synthetic --out DIR [--n-train 1000 --n-eval 200 --seed 0 --image-size 64]``
writes::

    DIR/{train,eval}/images/*.png      scenes and object crops (paths in the rows are relative to
                                       the parquet file's folder, the readers' default image root)
    DIR/train/<task>.parquet           MMEB-train rows (qry, qry_image_path, pos_text, pos_image_path,
                                       neg_text, neg_image_path); one hard negative per row
    DIR/eval/<task>.parquet            MMEB-eval instructed rows (qry_inst, qry_text, qry_img_path,
                                       tgt_inst, tgt_text[list], tgt_img_path[list]), positive first
    DIR/train.yaml                     the training manifest;  DIR/meta.json  tasks, meta-tasks, chance

A scene is one object (shape, color, size, position, sometimes a small word written in a corner).
Tasks, by MMEB meta-task: CLS ``color_cls``, ``shape_cls``; VQA ``attribute_vqa`` (color / shape /
position / size / word questions about the same image; hard negatives and candidates are the answers
to the *other* questions, so a model that ignores the instruction cannot score well, and wrong
answers of the asked type, so one that ignores the image cannot either);
RET ``caption_t2i``, ``caption_i2t`` (hard negatives differ in one attribute); VG ``grounding`` (a
two-object scene and a label; the target is the crop of that object). Images are written once and
shared by all tasks. Chance level per eval task is ``1 / num_candidates`` (``meta.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["generate", "Scene", "render", "TASKS"]

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 170),
    "orange": (240, 130, 20),
}
SIZES = ("small", "large")
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
WORDS = ("cat", "sun", "box", "map", "hat", "dog")  # no word is also a color, shape, size or position
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 238, 220))
IMG = "<|image_1|>"
CLS = "Represent the given image for classification"
QA = "Represent the given image with the following question"
QUESTIONS = {
    "color": "What color is the object?",
    "shape": "What shape is the object?",
    "position": "Where is the object?",
    "size": "How big is the object?",
    "word": "What word is written in the image?",
}
T2I = "Find me an everyday image that matches the given caption:"
I2T = "Find an image caption describing the given everyday image."
GROUND = "Select the portion of the image that isolates the object of the given label:"
IMG_TARGET = "Represent the given image."
CROP_TARGET = "Represent the given cropped image of the object."
TASKS = {  # name -> (meta-task, eval candidates)
    "color_cls": ("CLS", len(COLORS)),
    "shape_cls": ("CLS", len(SHAPES)),
    "attribute_vqa": ("VQA", 10),
    "caption_t2i": ("RET", 10),
    "caption_i2t": ("RET", 10),
    "grounding": ("VG", 10),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str
    word: str | None = None

    def caption(self) -> str:
        c = f"a {self.size} {self.color} {self.shape} {WHERE[self.position]}"
        return c + (f' with the word "{self.word}"' if self.word else "")

    def answer(self, attribute: str) -> str:
        return {"position": WHERE[self.position]}.get(attribute, getattr(self, attribute) or "")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    pts = []  # star
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        rr = r if k % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_object(d: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=fill)


def render(scene: Scene, size: int, rng: np.random.Generator, font: Any = None) -> Image.Image:
    """Draw one scene: background, the object at its position (with jitter), the optional word."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    d = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    j = rng.uniform(-0.03, 0.03, 2)
    r = (0.12 if scene.size == "small" else 0.21) * size * rng.uniform(0.92, 1.08)
    _draw_object(d, scene.shape, scene.color, (fx + j[0]) * size, (fy + j[1]) * size, r)
    if scene.word:
        corner = (2, 1) if scene.position in ("right", "bottom") else (size - 20, size - 13)
        d.text(corner, scene.word, fill=(20, 20, 20), font=font)
    return img


def _grounding_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple[str, list[float]]]]:
    """Two different objects left/right (or top/bottom): the image and [(label, bbox)] for both."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    d = ImageDraw.Draw(img)
    pair = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
    colors = rng.choice(list(COLORS), 2, replace=False)
    shapes = rng.choice(SHAPES, 2, replace=True)
    objs = []
    for pos, color, shape in zip(pair, colors, shapes):
        fx, fy = POSITIONS[pos]
        r = 0.17 * size
        cx, cy = fx * size + rng.uniform(-2, 2), fy * size + rng.uniform(-2, 2)
        _draw_object(d, str(shape), str(color), cx, cy, r)
        box = [max(0, cx - r - 2), max(0, cy - r - 2), min(size, cx + r + 2), min(size, cy + r + 2)]
        objs.append((f"{color} {shape}", box))
    return img, objs


def _random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=str(rng.choice(SHAPES)),
        color=str(rng.choice(list(COLORS))),
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(list(POSITIONS))),
        word=str(rng.choice(WORDS)) if rng.random() < 0.4 else None,
    )


def _vary(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with exactly one attribute changed (a hard negative)."""
    attr = str(rng.choice(["shape", "color", "size", "position"]))
    pool = {"shape": SHAPES, "color": list(COLORS), "size": SIZES, "position": list(POSITIONS)}[attr]
    value = str(rng.choice([v for v in pool if v != getattr(scene, attr)]))
    return Scene(**{**scene.__dict__, attr: value})


class _Writer:
    """Renders and saves images of one split; keeps rows per task."""

    def __init__(self, out: Path, split: str, size: int, rng: np.random.Generator) -> None:
        self.out, self.split, self.size, self.rng = out, split, size, rng
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        self.font = ImageFont.load_default()
        self.count = 0

    def save(self, img: Image.Image) -> str:
        rel = f"images/{self.count:06d}.png"
        img.save(self.out / self.split / rel, optimize=False, compress_level=1)
        self.count += 1
        return rel

    def scene(self, scene: Scene) -> str:
        return self.save(render(scene, self.size, self.rng, self.font))

    def crop(self, img: Image.Image, box: list[float]) -> str:
        return self.save(img.crop(tuple(int(round(b)) for b in box)).resize((self.size, self.size)))


def _values(attribute: str) -> list[str]:
    """Every possible answer to a question about ``attribute``."""
    return list({"color": COLORS, "shape": SHAPES, "size": SIZES, "position": WHERE.values(), "word": WORDS}[attribute])


def _attributes(scene: Scene) -> list[str]:
    return ["color", "shape", "position", "size"] + (["word"] if scene.word else [])


def _train_rows(w: _Writer, n: int, rng: np.random.Generator) -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = {t: [] for t in TASKS}
    scenes = [_random_scene(rng) for _ in range(n)]
    paths = [w.scene(s) for s in scenes]

    def row(q: str, qi: str, p: str, pi: str, nt: str, ni: str) -> dict[str, str]:
        return {
            "qry": q,
            "qry_image_path": qi,
            "pos_text": p,
            "pos_image_path": pi,
            "neg_text": nt,
            "neg_image_path": ni,
        }

    for s, path in zip(scenes, paths):
        wrong_color = str(rng.choice([c for c in COLORS if c != s.color]))
        wrong_shape = str(rng.choice([x for x in SHAPES if x != s.shape]))
        rows["color_cls"].append(row(f"{IMG} {CLS}: what color is the object?", path, s.color, "", wrong_color, ""))
        rows["shape_cls"].append(row(f"{IMG} {CLS}: what shape is the object?", path, s.shape, "", wrong_shape, ""))
        attrs = _attributes(s)
        a = str(rng.choice(attrs))
        if rng.random() < 0.5:  # hard negative: the answer to another question about the same image ...
            neg = s.answer(str(rng.choice([x for x in attrs if x != a])))
        else:  # ... or a wrong answer of the right type
            neg = str(rng.choice([v for v in _values(a) if v != s.answer(a)]))
        rows["attribute_vqa"].append(row(f"{IMG} {QA}: {QUESTIONS[a]}", path, s.answer(a), "", neg, ""))
        neg_scene = _vary(s, rng)
        neg_path = w.scene(neg_scene)
        rows["caption_t2i"].append(
            row(f"{T2I} {s.caption()}", "", f"{IMG} {IMG_TARGET}", path, f"{IMG} {IMG_TARGET}", neg_path)
        )
        rows["caption_i2t"].append(row(f"{IMG} {I2T}", path, s.caption(), "", neg_scene.caption(), ""))
    for _ in range(max(1, n // 2)):
        img, objs = _grounding_scene(rng, w.size)
        path = w.save(img)
        k = int(rng.integers(2))
        crops = [w.crop(img, box) for _, box in objs]
        rows["grounding"].append(
            row(
                f"{IMG} {GROUND} {objs[k][0]}",
                path,
                f"{IMG} {CROP_TARGET}",
                crops[k],
                f"{IMG} {CROP_TARGET}",
                crops[1 - k],
            )
        )
    return rows


def _eval_row(qi: str, qt: str, qp: str, ti: str, texts: list[str], imgs: list[str]) -> dict[str, Any]:
    return {"qry_inst": qi, "qry_text": qt, "qry_img_path": qp, "tgt_inst": ti, "tgt_text": texts, "tgt_img_path": imgs}


def _eval_rows(w: _Writer, n: int, rng: np.random.Generator) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TASKS}
    scenes = [_random_scene(rng) for _ in range(n)]
    paths = [w.scene(s) for s in scenes]
    for s, path in zip(scenes, paths):
        colors = [s.color] + [c for c in COLORS if c != s.color]
        shapes = [s.shape] + [x for x in SHAPES if x != s.shape]
        rows["color_cls"].append(
            _eval_row(f"{CLS}: what color is the object?", IMG, path, "", colors, [""] * len(colors))
        )
        rows["shape_cls"].append(
            _eval_row(f"{CLS}: what shape is the object?", IMG, path, "", shapes, [""] * len(shapes))
        )
        a = str(rng.choice(_attributes(s)))
        # distractors: the answers to the other questions about this image (ignoring the question fails),
        # then wrong answers of the asked type (reading the question without the image fails), then any
        own = [s.answer(x) for x in _attributes(s) if x != a]
        same = [str(v) for v in rng.permutation([v for v in _values(a) if v != s.answer(a)])]
        extra = same[: 9 - len(own)]
        pool = sorted({*COLORS, *SHAPES, *SIZES, *WHERE.values(), *WORDS} - {s.answer(a), *own, *extra})
        extra += [str(x) for x in rng.choice(pool, 9 - len(own) - len(extra), replace=False)]
        cands = [s.answer(a), *own, *extra]
        rows["attribute_vqa"].append(_eval_row(f"{QA}: {QUESTIONS[a]}", IMG, path, "", cands, [""] * len(cands)))
        # distractors: 4 one-attribute variations + 5 other scenes, none with the positive's caption
        distinct = [j for j in range(n) if scenes[j].caption() != s.caption()]
        others = [int(j) for j in rng.choice(distinct, 5, replace=False)]
        negs = [_vary(s, rng) for _ in range(4)]
        neg_paths = [w.scene(x) for x in negs] + [paths[j] for j in others]
        rows["caption_t2i"].append(_eval_row(T2I, s.caption(), "", IMG_TARGET, [IMG] * 10, [path, *neg_paths]))
        caps = [s.caption(), *[x.caption() for x in negs], *[scenes[j].caption() for j in others]]
        rows["caption_i2t"].append(_eval_row(I2T, IMG, path, "", caps, [""] * 10))
    crops_pool: list[tuple[str, str]] = []  # (crop path, its label)
    ground = []
    for _ in range(n):
        img, objs = _grounding_scene(rng, w.size)
        path = w.save(img)
        k = int(rng.integers(2))
        crops = [w.crop(img, box) for _, box in objs]
        ground.append((path, objs[k][0], crops[k], crops[1 - k]))
        crops_pool.extend(zip(crops, [label for label, _ in objs]))
    for path, label, pos, neg in ground:
        pool = [c for c, lab in crops_pool if lab != label and c not in (pos, neg)]  # never another copy of the label
        extra = [str(c) for c in rng.choice(pool, 8, replace=False)]
        rows["grounding"].append(_eval_row(f"{GROUND} {label}", IMG, path, CROP_TARGET, [IMG] * 10, [pos, neg, *extra]))
    return rows


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def generate(out: str | Path, n_train: int = 1000, n_eval: int = 200, seed: int = 0, image_size: int = 64) -> dict:
    """Write the demo set under ``out`` and return the ``meta.json`` contents."""
    out = Path(out)
    if n_train < 2 or n_eval < 12:
        raise ValueError(f"need n_train >= 2 and n_eval >= 12 (10 candidates per query), got {n_train}, {n_eval}")
    t0 = time.time()
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    train = _train_rows(
        _Writer(out, "train", image_size, np.random.default_rng([seed, 1])), n_train, np.random.default_rng([seed, 2])
    )
    evals = _eval_rows(
        _Writer(out, "eval", image_size, np.random.default_rng([seed, 3])), n_eval, np.random.default_rng([seed, 4])
    )
    manifest = ["# Training manifest of the synthetic demo set (mmembed.data.synthetic).", "datasets:"]
    for task, rows in train.items():
        _write_parquet(rows, out / "train" / f"{task}.parquet")
        manifest += [f"  - name: {task}", f"    path: train/{task}.parquet", "    weight: 1.0"]
    (out / "train.yaml").write_text("\n".join(manifest) + "\n")
    tasks = {}
    for task, rows in evals.items():
        _write_parquet(rows, out / "eval" / f"{task}.parquet")
        k = len(rows[0]["tgt_text"])
        tasks[task] = {"meta_task": TASKS[task][0], "num_queries": len(rows), "num_candidates": k, "chance": 1.0 / k}
    meta = {
        "generator": "mmembed.data.synthetic",
        "seed": seed,
        "image_size": image_size,
        "n_train": {t: len(r) for t, r in train.items()},
        "tasks": tasks,
        "seconds": round(time.time() - t0, 2),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mmembed.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n-train", type=int, default=1000, help="train scenes (each gives one row per task)")
    ap.add_argument("--n-eval", type=int, default=200, help="eval queries per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    a = ap.parse_args(argv)
    meta = generate(a.out, a.n_train, a.n_eval, a.seed, a.image_size)
    n = sum(meta["n_train"].values())
    print(f"wrote {n} train rows and {len(meta['tasks'])} eval tasks to {a.out} in {meta['seconds']}s")
    for task, t in meta["tasks"].items():
        size = f"{t['num_queries']} queries x {t['num_candidates']} candidates"
        print(f"  {task:14s} {t['meta_task']}  {size}, chance {t['chance']:.3f}")


if __name__ == "__main__":
    main()

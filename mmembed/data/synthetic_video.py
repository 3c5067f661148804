"""Demo data for video and visual documents: rendered clips and pages in MMEB-like rows, offline and deterministic.

``python -m mmembed.data.synthetic_video --out DIR [--n-train 300 --n-eval 60 --seed 0 --size 32 --frames 16]``
writes::

    DIR/{train,eval}/videos/*.mkv          clips (FFV1 in Matroska: lossless, so decoding gives the rendered frames;
                                           ``--as-frames`` writes a folder of PNG frames per clip instead)
    DIR/eval/videos_shuffled/*.mkv         the time-shuffled control: each eval clip's frames, permuted
    DIR/{train,eval}/images/*.png          document pages
    DIR/train/motion_cls.parquet           qry, qry_video_path, pos_text, pos_video_path, neg_text, neg_video_path
    DIR/train/doc_t2i.parquet              the image demo's MMEB-train columns (qry, qry_image_path, pos_text, ...)
    DIR/eval/motion_cls.parquet            qry_inst, qry_text, qry_video_path, tgt_inst, tgt_text[list],
                                           tgt_video_path[list] (positive first)
    DIR/eval/motion_cls_shuffled.parquet   the same rows on the shuffled clips
    DIR/eval/doc_t2i.parquet               the image demo's MMEB-eval columns;  DIR/meta.json  tasks, chance

``motion_cls`` (CLS): a square moves along one of three paths (a circle, a horizontal swing, a vertical swing) in
one of two directions, six classes. Each clip covers one full period, so its first and last frames show the square
at the same place, and the opposite direction is the same clip played backwards: both classes have the same
frames, only their order differs. With frames shuffled only the path (one of three) can be told, so the control
is bounded by 1/2 while chance is 1/6 (keep ``max_frames`` >= ``--frames`` so every frame is sampled).
``doc_t2i`` (RET): pages of pseudo-word lines in PIL's default font; the query is a few consecutive words of one
line, the targets pages; no distractor page contains the snippet. Video placeholders are ``<|video_1|>`` (MMEB's
image convention, ``<|image_1|>``, for videos); readers for the video columns are not part of this module.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmembed.data.synthetic import BACKGROUNDS, COLORS, IMG, _write_parquet

__all__ = ["MOTIONS", "render_clip", "write_clip", "shuffle_clip", "render_page", "generate"]

VID = "<|video_1|>"
#: class -> (path, direction); direction -1 is the +1 clip played backwards
MOTIONS = {
    "moving clockwise in a circle": ("circle", 1),
    "moving counter-clockwise in a circle": ("circle", -1),
    "swinging right first": ("horizontal", 1),
    "swinging left first": ("horizontal", -1),
    "swinging down first": ("vertical", 1),
    "swinging up first": ("vertical", -1),
}
MOTION_CLS = "Represent the given video for classification: how does the square move?"
DOC_T2I = "Find the document page that contains the given text:"
PAGE_TARGET = "Represent the given document page."
TASKS = {"motion_cls": ("CLS", len(MOTIONS)), "motion_cls_shuffled": ("CLS", len(MOTIONS)), "doc_t2i": ("RET", 10)}


def render_clip(motion: str, rng: np.random.Generator, size: int = 32, num_frames: int = 16) -> np.ndarray:
    """One clip of ``motion`` (a :data:`MOTIONS` key): uint8 (T, H, W, 3), T = ``num_frames``, H = W = ``size``.

    Frame k shows the square at phase 2*pi*k/(T-1) of its path (frame 0 and frame T-1 at the same place); the
    nuisances (square colour, background, the circle's start angle, the swing's offset) come from ``rng``.
    """
    if num_frames < 3:
        raise ValueError(f"a clip needs at least 3 frames, got {num_frames}")
    path, direction = MOTIONS[motion]
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    color = list(COLORS.values())[int(rng.integers(len(COLORS)))]
    c, amp, half = (size - 1) / 2, 0.3 * size, max(1, round(0.1 * size))
    phase = 2 * math.pi * np.arange(num_frames) / (num_frames - 1)
    if path == "circle":  # image y points down: increasing angle is clockwise on screen
        start = rng.uniform(0, 2 * math.pi)
        xy = np.stack([c + amp * np.cos(start + phase), c + amp * np.sin(start + phase)], axis=1)
    else:
        offset = rng.uniform(-0.1, 0.1) * size
        swing, across = c + amp * np.sin(phase), np.full(num_frames, c + offset)
        xy = np.stack([swing, across] if path == "horizontal" else [across, swing], axis=1)
    centres = np.rint(xy).astype(np.int64)  # (T, 2) x, y
    yy, xx = np.mgrid[0:size, 0:size]  # (H, W)
    inside = (np.abs(xx[None] - centres[:, 0, None, None]) <= half) & (
        np.abs(yy[None] - centres[:, 1, None, None]) <= half
    )  # (T, H, W)
    frames = np.where(inside[..., None], np.array(color, np.uint8), np.array(bg, np.uint8)).astype(np.uint8)
    return frames if direction == 1 else np.ascontiguousarray(frames[::-1])


def write_clip(frames: np.ndarray, root: Path, rel: str, fps: int = 8, as_frames: bool = False) -> str | list[str]:
    """Write (T, H, W, 3) uint8 frames as an FFV1/Matroska file ``root/rel``, or as PNGs ``root/rel/NNN.png``.

    FFV1 with ``bgr0`` pixels is lossless for RGB, so :func:`mmembed.video.load_video` returns ``frames`` exactly;
    the file is written bit-exact (FFmpeg's ``fflags=+bitexact``), so a seed gives the same bytes.
    Returns what a row holds: ``rel``, or the list of the frames' paths relative to ``root`` (a frame-list video).
    """
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_frames:
        path.mkdir(exist_ok=True)
        for k, f in enumerate(frames):
            Image.fromarray(f).save(path / f"{k:03d}.png", compress_level=1)
        return [f"{rel}/{k:03d}.png" for k in range(len(frames))]
    import av

    # bitexact: no random segment UID, no library version strings, so the same clip gives the same bytes
    with av.open(str(path), mode="w", format="matroska", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return rel


def shuffle_clip(frames: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same (T, H, W, 3) frames in a random order that differs from the original: (frames[perm], perm (T,))."""
    perm = np.arange(len(frames))
    while np.array_equal(frames[perm], frames):  # identity, or a permutation of equal frames: draw again
        perm = rng.permutation(len(frames))
    return np.ascontiguousarray(frames[perm]), perm


def _words(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct pronounceable pseudo-words (consonant-vowel syllables)."""
    cons, vows, out = "bdfgklmnprstvz", "aeiou", set()
    while len(out) < n:
        k = int(rng.integers(2, 4))
        out.add("".join(cons[int(rng.integers(len(cons)))] + vows[int(rng.integers(len(vows)))] for _ in range(k)))
    return sorted(out)


def render_page(lines: list[str], size: tuple[int, int] = (128, 128), font: Any = None) -> Image.Image:
    """A white (W, H) = ``size`` page with ``lines`` in PIL's default font, one per row from the top."""
    img = Image.new("RGB", size, (255, 255, 255))
    d, font = ImageDraw.Draw(img), font or ImageFont.load_default()
    for k, line in enumerate(lines):
        d.text((4, 4 + 14 * k), line, fill=(20, 20, 20), font=font)
    return img


class _Pages:
    """Random pages of one split (lines of ``per_line`` words) and the snippets that find them."""

    def __init__(self, rng: np.random.Generator, n: int, vocab: list[str], lines: int = 7, per_line: int = 3) -> None:
        self.lines = [[" ".join(rng.choice(vocab, per_line)) for _ in range(lines)] for _ in range(n)]
        self.text = ["\n".join(p) for p in self.lines]

    def snippet(self, i: int, rng: np.random.Generator) -> str:
        """Two or three consecutive words of one line of page ``i``."""
        words = self.lines[i][int(rng.integers(len(self.lines[i])))].split()
        k = int(rng.integers(2, len(words) + 1))
        s = int(rng.integers(len(words) - k + 1))
        return " ".join(words[s : s + k])

    def without(self, snippet: str, rng: np.random.Generator, k: int, exclude: int) -> list[int]:
        """``k`` other pages whose text does not contain ``snippet``."""
        ok = [j for j, t in enumerate(self.text) if j != exclude and snippet not in t]
        return [int(j) for j in rng.choice(ok, k, replace=False)]


def _split(out: Path, split: str, n: int, rng: np.random.Generator, size: int, frames: int, as_frames: bool) -> dict:
    """Render one split: its clips (and shuffled clips for eval), its pages, and the rows of every task."""
    root, train = out / split, split == "train"
    classes = list(MOTIONS)
    rows: dict[str, list[dict[str, Any]]] = {"motion_cls": [], "motion_cls_shuffled": [], "doc_t2i": []}
    ext = "" if as_frames else ".mkv"
    for i in range(n):
        label = classes[i % len(classes)] if i < len(classes) else classes[int(rng.integers(len(classes)))]
        clip = render_clip(label, rng, size, frames)
        rel = write_clip(clip, root, f"videos/{i:06d}{ext}", as_frames=as_frames)
        if train:
            path, _ = MOTIONS[label]  # hard negative: the same path the other way round, half the time
            twin = next(c for c in classes if MOTIONS[c][0] == path and c != label)
            neg = twin if rng.random() < 0.5 else str(rng.choice([c for c in classes if c != label]))
            rows["motion_cls"].append(
                {
                    "qry": f"{VID} {MOTION_CLS}",
                    "qry_video_path": rel,
                    "pos_text": label,
                    "pos_video_path": "",
                    "neg_text": neg,
                    "neg_video_path": "",
                }
            )
            continue
        shuffled, _ = shuffle_clip(clip, rng)
        srel = write_clip(shuffled, root, f"videos_shuffled/{i:06d}{ext}", as_frames=as_frames)
        cands = [label] + [c for c in classes if c != label]
        for task, video in (("motion_cls", rel), ("motion_cls_shuffled", srel)):
            rows[task].append(
                {
                    "qry_inst": MOTION_CLS,
                    "qry_text": VID,
                    "qry_video_path": video,
                    "tgt_inst": "",
                    "tgt_text": cands,
                    "tgt_video_path": [""] * len(cands),
                }
            )
    pages = _Pages(rng, max(n, 12), _words(rng, 60))
    font = ImageFont.load_default()
    paths = []
    for k, lines in enumerate(pages.lines):
        rel = f"images/page_{k:06d}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        render_page(lines, font=font).save(root / rel, compress_level=1)
        paths.append(rel)
    for i in range(len(pages.lines)):
        snippet = pages.snippet(i, rng)
        others = [paths[j] for j in pages.without(snippet, rng, 1 if train else 9, i)]
        if train:
            rows["doc_t2i"].append(
                {
                    "qry": f"{DOC_T2I} {snippet}",
                    "qry_image_path": "",
                    "pos_text": f"{IMG} {PAGE_TARGET}",
                    "pos_image_path": paths[i],
                    "neg_text": f"{IMG} {PAGE_TARGET}",
                    "neg_image_path": others[0],
                }
            )
        else:
            rows["doc_t2i"].append(
                {
                    "qry_inst": DOC_T2I,
                    "qry_text": snippet,
                    "qry_img_path": "",
                    "tgt_inst": PAGE_TARGET,
                    "tgt_text": [IMG] * 10,
                    "tgt_img_path": [paths[i], *others],
                }
            )
    return {t: r for t, r in rows.items() if r}


def generate(
    out: str | Path,
    n_train: int = 300,
    n_eval: int = 60,
    seed: int = 0,
    size: int = 32,
    num_frames: int = 16,
    as_frames: bool = False,
) -> dict:
    """Write the video and document demo tasks under ``out``; returns the ``meta.json`` contents."""
    out = Path(out)
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"need n_train >= 1 and n_eval >= 1, got {n_train}, {n_eval}")
    meta: dict[str, Any] = {"generator": "mmembed.data.synthetic_video", "seed": seed, "size": size}
    meta.update({"num_frames": num_frames, "as_frames": as_frames, "n_train": {}, "tasks": {}})
    for split, n, stream in (("train", n_train, 1), ("eval", n_eval, 2)):
        rows = _split(out, split, n, np.random.default_rng([seed, stream]), size, num_frames, as_frames)
        for task, task_rows in rows.items():
            _write_parquet(task_rows, out / split / f"{task}.parquet")
            if split == "train":
                meta["n_train"][task] = len(task_rows)
            else:
                k = len(task_rows[0]["tgt_text"])
                meta["tasks"][task] = {
                    "meta_task": TASKS[task][0],
                    "num_queries": len(task_rows),
                    "num_candidates": k,
                    "chance": 1.0 / k,
                }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mmembed.data.synthetic_video", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n-train", type=int, default=300, help="train clips (and at least as many pages)")
    ap.add_argument("--n-eval", type=int, default=60, help="eval clips (and at least as many pages)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32, help="clip side in pixels")
    ap.add_argument("--frames", type=int, default=16, help="frames per clip")
    ap.add_argument("--as-frames", action="store_true", help="write each clip as a folder of PNG frames")
    a = ap.parse_args(argv)
    meta = generate(a.out, a.n_train, a.n_eval, a.seed, a.size, a.frames, a.as_frames)
    for task, t in meta["tasks"].items():
        size = f"{t['num_queries']} queries x {t['num_candidates']} candidates"
        print(f"  {task:20s} {t['meta_task']}  {size}, chance {t['chance']:.3f}")


if __name__ == "__main__":
    main()

"""open_clip baselines scored by the same protocol (docs/mmeb.md §1.11: CLIP 37.8, OpenCLIP 39.7 on MMEB-V1).

:class:`OpenClipEncoder` gives any ``open_clip`` model mmembed's ``encode`` interface:

- a row with images and no text -> image tower (several images: mean of their normalized embeddings);
- a row with text and no image -> text tower; the instruction, when given, is prepended to the text
  (``"{instruction} {text}"``), as MMEB-V1's ``qry_text`` carries it inline for the CLIP baselines
  of VLM2Vec's ``evaluation/eval_openclip.py`` (v1 branch);
- a row with both -> ``normalize(normalize(image) + normalize(text))``: UniIR's score-level fusion
  (CLIP_SF, Wei et al., arXiv 2311.17136 §4.1) on unit vectors;
- image-only rows ignore their instruction (the image tower takes no text).

The image placeholder is the empty string, so MMEB's ``<|image_1|>`` markers are simply removed.
Spec strings for :func:`load_openclip` and ``mmembed eval``: ``openclip:ARCH[:PRETRAINED]`` where
ARCH is an open_clip architecture name or a path to an open_clip model-config JSON, and PRETRAINED
an open_clip pretrained tag or a local weights file (without it the weights are random, seed 0, and the
output and ``scores.md`` say so); weights that cannot be downloaded (offline) are a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmembed import dist
from mmembed.data.sample import ImageRef
from mmembed.images import load_image

__all__ = ["OpenClipEncoder", "load_openclip", "PREFIX"]

PREFIX = "openclip:"


class _Proc:
    placeholder = ""


class OpenClipEncoder:
    """An open_clip model behind ``encode(texts=, images=, instruction=, batch_size=, ...)``.

    Args:
        model: an ``open_clip.CLIP`` (or anything with ``encode_image``/``encode_text``).
        preprocess: the image transform (PIL -> (3, S, S) tensor), e.g. open_clip's val transform.
        tokenizer: open_clip tokenizer (list of str -> (B, L) long tensor).
        name: shown in reports; ``fingerprint``: cache key (default: hash of name and weights).
    """

    def __init__(
        self, model: Any, preprocess: Any, tokenizer: Any, name: str = "openclip", fingerprint: str | None = None
    ):
        self.model = model.eval()
        self.preprocess, self.tokenizer, self.name = preprocess, tokenizer, name
        self.processor = _Proc()
        self.fingerprint = fingerprint or self._hash_weights()
        self.random_weights = False  # set by load_openclip for ARCH without a pretrained tag
        self.warnings: list[str] = []  # lines the report repeats (scores.md, scores.json)

    def _hash_weights(self) -> str:
        h = hashlib.blake2b(self.name.encode(), digest_size=16)
        for k, v in self.model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    @property
    def embed_dim(self) -> int | None:
        proj = getattr(self.model, "text_projection", None)
        return int(proj.shape[-1]) if isinstance(proj, torch.Tensor) else None

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[ImageRef | Sequence[ImageRef] | None] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to: str = "numpy",
    ) -> np.ndarray | torch.Tensor:
        """(N, D) float32 unit vectors for aligned ``texts``/``images`` rows (see the module doc)."""

        n = len(texts) if texts is not None else len(images or [])
        texts = list(texts) if texts is not None else [None] * n
        imgs = list(images) if images is not None else [None] * n
        insts = [instruction] * n if instruction is None or isinstance(instruction, str) else list(instruction)
        if not (len(texts) == len(imgs) == len(insts) == n):
            raise ValueError(f"texts ({len(texts)}), images ({len(imgs)}) and instructions ({len(insts)}) must align")
        full = []
        for i in range(n):
            t = texts[i].strip() if texts[i] else ""
            if t and insts[i]:
                t = f"{insts[i].strip()} {t}"
            full.append(t or None)
        img_rows = [(i, im if isinstance(im, (list, tuple)) else [im]) for i, im in enumerate(imgs) if im is not None]
        txt_rows = [i for i in range(n) if full[i] is not None]
        dev = next(self.model.parameters()).device
        dim = None
        img_emb: dict[int, torch.Tensor] = {}
        flat = [(i, im) for i, ims in img_rows for im in ims]
        for s in range(0, len(flat), max(1, batch_size)):
            chunk = flat[s : s + batch_size]
            x = torch.stack([self.preprocess(load_image(im)) for _, im in chunk])
            e = F.normalize(self.model.encode_image(x.to(dev)).float().cpu(), dim=-1)
            for (i, _), v in zip(chunk, e):
                img_emb[i] = img_emb[i] + v if i in img_emb else v.clone()
        txt_emb: dict[int, torch.Tensor] = {}
        for s in range(0, len(txt_rows), max(1, batch_size)):
            idx = txt_rows[s : s + batch_size]
            tokens = self.tokenizer([full[i] for i in idx]).to(dev)
            e = F.normalize(self.model.encode_text(tokens).float().cpu(), dim=-1)
            txt_emb.update(zip(idx, e))
        for e in (*img_emb.values(), *txt_emb.values()):
            dim = e.shape[-1]
            break
        out = torch.zeros(n, dim or (self.embed_dim or 0))
        for i in range(n):
            parts = [F.normalize(img_emb[i], dim=-1)] if i in img_emb else []
            parts += [txt_emb[i]] if i in txt_emb else []
            if not parts:
                raise ValueError(f"row {i}: neither text nor image")
            out[i] = F.normalize(sum(parts), dim=-1)
        if convert_to == "torch":
            return out
        if convert_to != "numpy":
            raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        return out.numpy()


def load_openclip(spec: str, device: str | None = None) -> OpenClipEncoder:
    """``openclip:ARCH[:PRETRAINED]`` -> :class:`OpenClipEncoder` (offline when the weights are local).

    Without PRETRAINED the weights are random (seeded): a warning line says so, and the encoder's ``warnings``
    carry it into ``scores.md``.

    Raises:
        ValueError: an unknown architecture or pretrained tag, or weights that could not be downloaded (no
            network, ``HF_HUB_OFFLINE=1`` with an empty cache): one line naming ``spec``.
    """
    import open_clip

    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    arch, _, pretrained = body.partition(":")
    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise FileNotFoundError(f"{arch}: open_clip model config not found")
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
    if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(arch, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ValueError(
            f"{PREFIX}{body}: {pretrained!r} is neither a pretrained tag of {arch} (known: {tags}) nor a weights file"
        )
    torch.manual_seed(0)  # random-init baselines are reproducible
    try:
        with _quiet_open_clip_errors():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained or None, device=device or "cpu"
            )
    except RuntimeError as e:
        if not pretrained or os.path.isfile(pretrained):
            raise
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        raise ValueError(
            f"{PREFIX}{body}: the pretrained weights {pretrained!r} of {arch} could not be downloaded, nor found in "
            f"the local Hugging Face cache (offline: HF_HUB_OFFLINE=1 or no network?): {reason}"
        ) from None
    tokenizer = open_clip.get_tokenizer(arch)
    fp = None
    if pretrained and os.path.isfile(pretrained):
        h = hashlib.blake2b(body.encode(), digest_size=16)
        h.update(str(os.path.getsize(pretrained)).encode())
        with open(pretrained, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        fp = h.hexdigest()
    enc = OpenClipEncoder(model, preprocess, tokenizer, name=f"{PREFIX}{body}", fingerprint=fp)
    enc.random_weights = not pretrained
    if not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        example = f" (e.g. {PREFIX}{arch}:{tags[0]})" if tags else ""
        warning = (
            f"warning: {PREFIX}{body} has no pretrained tag: its weights are RANDOM (seeded init), so this is a "
            f"random-weights baseline, not CLIP; give {PREFIX}ARCH:TAG or a weights file{example}"
        )
        enc.warnings.append(warning)
        dist.print0(warning, file=sys.stderr)
    return enc


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "open_clip" in record.pathname)


@contextlib.contextmanager
def _quiet_open_clip_errors() -> Iterator[None]:
    """open_clip logs its download failures on the root logger before raising; the error we raise says it once."""
    f = _DropRecords()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)

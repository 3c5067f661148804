"""Safe image loading and the encoder-specific transform.

Every image goes through :func:`load_image`: the pixel count and the aspect ratio are checked from
the header before any decoding (decompression bombs; a 1 x 100000 strip is tiny on disk but becomes
S x 100000*S pixels when resized by its shorter side), the file is fully decoded (truncated files fail
here, not later in a worker), an EXIF ``Orientation`` tag is applied (a phone photo stored sideways comes out
upright, for training, eval and encode alike), and any mode (CMYK, 16-bit, palette, alpha) becomes 8-bit RGB.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "load_image", "to_rgb", "ImageTransform", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_ASPECT_RATIO"]

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default; mmembed checks it itself so the limit holds everywhere
# Qwen2-VL's image processor (transformers ``smart_resize``) refuses "absolute aspect ratio must be smaller
# than 200"; the same bound here keeps every backbone's resize finite (see ImageTransform).
DEFAULT_MAX_ASPECT_RATIO = 200.0


class ImageError(ValueError):
    """An image that cannot be used: names the source (path or description) and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {reason}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparent pixels are composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        scale = 255.0 / hi if hi > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _check_aspect(label: str, w: int, h: int, max_aspect_ratio: float) -> None:
    """Raise :class:`ImageError` when ``max(w, h) / min(w, h)`` exceeds ``max_aspect_ratio`` (0 sizes pass)."""
    lo, hi = min(w, h), max(w, h)
    if lo > 0 and hi > max_aspect_ratio * lo:
        raise ImageError(label, f"aspect ratio {w}:{h} exceeds the limit {max_aspect_ratio:g}:1")


def _upright(img: Image.Image) -> Image.Image:
    """``img`` rotated / flipped as its EXIF ``Orientation`` tag says (the same image when there is none)."""
    try:
        if img.getexif().get(0x0112, 1) in (None, 1):  # no tag, or already upright: no copy
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: keep the pixels as stored rather than lose the image
        return img


def load_image(
    src: str | os.PathLike | bytes | Image.Image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Open, check and decode one image into RGB.

    Args:
        src: a path, encoded bytes, or a PIL image.
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding).
        name: how to name the image in errors (defaults to the path).
        max_aspect_ratio: refuse images whose long side is more than this many times the short side
            (checked from the header, before decoding; Qwen2-VL's processor refuses > 200 as well).

    Returns:
        The RGB image upright: an EXIF ``Orientation`` tag (2-8) is applied after the size checks.

    Raises:
        ImageError: missing, empty, truncated, not an image, too large, or too thin.
    """
    label = name or (str(src) if isinstance(src, (str, os.PathLike)) else "<image bytes>")
    if isinstance(src, Image.Image):
        img = src
        if img.width * img.height > max_pixels:
            raise ImageError(label, f"{img.width}x{img.height} exceeds the pixel limit {max_pixels}")
        _check_aspect(label, img.width, img.height, max_aspect_ratio)
        return to_rgb(_upright(img))
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(label, "file not found")
        if path.stat().st_size == 0:
            raise ImageError(label, "empty file (0 bytes)")
        fp: Any = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError(label, "empty image bytes")
        fp = io.BytesIO(bytes(src))
    else:
        raise ImageError(label, f"expected a path, bytes or a PIL image, got {type(src).__name__}")
    try:
        # PIL's own bomb check would also fire in open(); ours runs first with the configured limit.
        with Image.open(fp) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(label, f"{w}x{h} = {w * h} pixels exceeds the pixel limit {max_pixels}")
            if w == 0 or h == 0:
                raise ImageError(label, f"degenerate size {w}x{h}")
            _check_aspect(label, w, h, max_aspect_ratio)
            img.load()
            return to_rgb(_upright(img))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(label, f"exceeds PIL's pixel limit: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(label, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(label, f"cannot decode: {e}") from None


@dataclass
class ImageTransform:
    """Resize (shorter side), center-crop to a square and normalize: (3, S, S) float32.

    The parameters come from the vision encoder's own preprocessing config (timm ``pretrained_cfg``,
    open_clip ``preprocess_cfg``, an HF image processor), so each encoder sees what it was trained on.

    Memory bound: resizing by the shorter side makes a ``w x h`` image ``S x S*max(w,h)/min(w,h)``
    before the crop (a 1 x 100000 strip: 64 x 6.4M pixels, ~2 GB). Images within
    :data:`DEFAULT_MAX_ASPECT_RATIO` (all that :func:`load_image` lets through) are resized exactly as
    before, so the intermediate is at most ``S x 200*S``; a thinner image handed in directly is first cut
    to its centre square, the only region the crop keeps, so its intermediate is ``S x S``.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # "shortest": resize shorter side then center crop; "squash": resize to S x S

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }

    def __call__(self, img: Image.Image) -> torch.Tensor:
        resample = {
            "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST,
            "lanczos": Image.Resampling.LANCZOS,
        }.get(self.interpolation, Image.Resampling.BICUBIC)
        s = self.size
        w, h = img.size
        thin = max(w, h) > DEFAULT_MAX_ASPECT_RATIO * min(w, h)  # only such images take the bounded paths below
        if self.resize_mode == "squash":
            if thin and h > w:  # PIL resizes width first: 1 x 100000 -> S x 100000 before the height pass
                img = img.resize((w, s), resample)
            img = img.resize((s, s), resample)
        else:
            if thin:  # keep only the centre square, the region the crop below keeps: S x S, not S x S*h/w
                lo = min(w, h)
                left, top = (w - lo) // 2, (h - lo) // 2
                img = img.crop((left, top, left + lo, top + lo))
                w, h = img.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), resample)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        # one copy: uint8 HWC -> float CHW, normalized in place
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return x.sub_(mean).div_(std)

"""Safe image loading and the encoder-specific transform.

Every image goes through :func:`load_image`: the pixel count is checked from the header before
any decoding (decompression bombs), the file is fully decoded (truncated files fail here, not
later in a worker), and any mode (CMYK, 16-bit, palette, alpha) becomes 8-bit RGB.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageError", "load_image", "to_rgb", "ImageTransform", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default; mmembed checks it itself so the limit holds everywhere


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


def load_image(
    src: str | os.PathLike | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open, check and decode one image into RGB.

    Args:
        src: a path, encoded bytes, or a PIL image.
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding).
        name: how to name the image in errors (defaults to the path).

    Raises:
        ImageError: missing, empty, truncated, not an image, or too large.
    """
    label = name or (str(src) if isinstance(src, (str, os.PathLike)) else "<image bytes>")
    if isinstance(src, Image.Image):
        img = src
        if img.width * img.height > max_pixels:
            raise ImageError(label, f"{img.width}x{img.height} exceeds the pixel limit {max_pixels}")
        return to_rgb(img)
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
            img.load()
            return to_rgb(img)
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
        if self.resize_mode == "squash":
            img = img.resize((s, s), resample)
        else:
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

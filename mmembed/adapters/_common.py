"""What the adapters share: resolving the model argument, the missing-package error, image conversion.

Imports no framework and nothing of the training stack (no deepspeed, no ``torch.distributed`` use).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmembed.model import EmbeddingModel
from mmembed.types import ImageRef

__all__ = ["resolve_model", "missing", "to_image_ref", "to_rows", "encode_role", "ROLES"]

#: ``role`` values of the adapters: which of the model's encode methods embeds the input
ROLES = ("query", "document", None)


def missing(module: str, package: str, extra: str) -> str:
    """The message of the ImportError an adapter raises when its framework is not installed."""
    return f"{module} needs {package}, which is not installed: pip install mmembed[{extra}]"


def resolve_model(model: EmbeddingModel | str | os.PathLike, **load_kwargs: Any) -> EmbeddingModel:
    """A loaded model as is, or a model directory loaded with :func:`mmembed.load` (``load_kwargs`` passed on).

    Raises:
        TypeError: ``model`` is neither an :class:`~mmembed.EmbeddingModel` nor a path, or ``load_kwargs`` are given
            with an already-loaded model (they would be silently ignored).
    """
    if isinstance(model, EmbeddingModel):
        if load_kwargs:
            raise TypeError(
                f"load options ({', '.join(sorted(load_kwargs))}) apply to a model directory, not to a loaded model"
            )
        return model
    if isinstance(model, (str, os.PathLike)):
        from mmembed.build import load

        return load(model, **load_kwargs)
    raise TypeError(f"expected an mmembed EmbeddingModel or a model directory, got {type(model).__name__}")


def _tensor_to_pil(t: Any) -> Any:
    """A (C, H, W) or (H, W) image tensor / array (uint8 0..255 or float 0..1) as a PIL image."""
    from PIL import Image

    arr = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def to_image_ref(image: Any) -> ImageRef:
    """One image as something :meth:`EmbeddingModel.encode` takes (a path, encoded bytes or a PIL image).

    Also accepted: a binary file object (``io.BytesIO``, LlamaIndex's ``ImageType``), a ``datasets`` image dict
    (``{"bytes": ..., "path": ...}``, undecoded), and a torch tensor or numpy array of pixels ((C, H, W) or
    (H, W, C), uint8 or floats in 0..1).
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike, bytes, Image.Image)):
        return image
    if isinstance(image, (bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, io.IOBase) or hasattr(image, "getvalue") or hasattr(image, "read"):
        if hasattr(image, "getvalue"):
            return bytes(image.getvalue())
        if hasattr(image, "seek"):
            image.seek(0)
        return bytes(image.read())
    if isinstance(image, Mapping):
        if image.get("bytes"):
            return bytes(image["bytes"])
        if image.get("path"):
            return image["path"]
        raise TypeError("an image dict needs 'bytes' or 'path'")
    if isinstance(image, np.ndarray) or type(image).__module__.startswith("torch"):
        return _tensor_to_pil(image)
    raise TypeError(f"cannot use {type(image).__name__} as an image (expected a path, bytes, PIL image or tensor)")


def to_rows(images: Sequence[Any] | None) -> list[ImageRef | list[ImageRef] | None] | None:
    """Per row ``None``, one image, or a list of images (a multi-image row), converted with :func:`to_image_ref`."""
    if images is None:
        return None
    out: list[ImageRef | list[ImageRef] | None] = []
    for item in images:
        if item is None:
            out.append(None)
        elif isinstance(item, (list, tuple)):
            out.append([to_image_ref(x) for x in item] or None)
        else:
            out.append(to_image_ref(item))
    return out


def encode_role(
    model: EmbeddingModel,
    role: str | None,
    texts: Sequence[str | None] | None = None,
    images: Sequence[Any] | None = None,
    **encode_kwargs: Any,
) -> np.ndarray:
    """(N, d) float32 embeddings from ``encode_query`` (``role="query"``), ``encode_document`` (``"document"``) or
    ``encode`` (``None``), with images converted by :func:`to_rows`."""
    if role not in ROLES:
        raise ValueError(f"role must be 'query', 'document' or None, got {role!r}")
    fn = {"query": model.encode_query, "document": model.encode_document, None: model.encode}[role]
    return fn(texts=texts, images=to_rows(images), **encode_kwargs)

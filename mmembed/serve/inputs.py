"""Request inputs of ``mmembed serve``: OpenAI ``input`` values -> :class:`Item` rows, images from ``data:`` URLs only.

Three input forms (docs/serve.md, "Inputs"):

- a string, or a list of strings: text rows (OpenAI's own form);
- ``{"text": ..., "image": "data:image/png;base64,..." | [...], "instruction": ...}``: mmembed's simple form (the
  fields of a ``mmembed encode`` row; ``image`` may also be bare base64);
- ``{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
  {"type": "text", "text": "..."}]}]}``: the chat form vLLM accepts for multimodal embeddings. ``system`` text
  becomes the row's instruction; an image that follows text is placed there with the model's image placeholder
  (images before any text come first, mmembed's default layout).

Nothing is fetched: an ``http(s)://`` or file URL is refused (400). Images are decoded here, in the request's
thread, through :func:`mmembed.images.load_image` (pixel limit and aspect ratio checked from the header before
decoding), so a bad image fails its own request and never reaches the model's batch.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mmembed.images import DEFAULT_MAX_PIXELS, ImageError, load_image

__all__ = ["ServeError", "Item", "parse_input", "parse_item", "decode_image"]

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


class ServeError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body (OpenAI's error shape)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Item:
    """One row to embed: text and/or decoded RGB images, and the row's own instruction (``None``: the request's)."""

    text: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    instruction: str | None = None

    @property
    def kind(self) -> str:
        """``"text"`` or ``"image"``: the worker encodes the two kinds in separate forward passes."""
        return "image" if self.images else "text"


def decode_image(value: Any, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A ``data:image/...;base64,`` URL (or bare base64) -> an RGB image, checked by :func:`load_image`.

    Raises:
        ServeError: 400 for a remote URL, bad base64, a non-image media type or undecodable bytes; 413 for an image
            over the pixel limit.
    """
    if not isinstance(value, str):
        raise ServeError(400, f"{where}: an image must be a data: URL string, got {type(value).__name__}", param=where)
    text = value.strip()
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise ServeError(
            400,
            f"{where}: only data: URLs (data:image/...;base64,...) are accepted; the server fetches no remote or "
            "file URLs",
            param=where,
            code="invalid_image_url",
        )
    m = _DATA_URL.match(text)
    if m:
        mime, params = m.group("mime").strip().lower(), m.group("params").lower()
        if mime and not mime.startswith("image/"):
            raise ServeError(400, f"{where}: media type {mime!r} is not an image", param=where, code="invalid_image")
        if ";base64" not in params:
            raise ServeError(400, f"{where}: a data: URL must be base64 encoded (;base64,)", param=where)
        payload = m.group("data")
    elif text.startswith("data:"):
        raise ServeError(400, f"{where}: malformed data: URL (expected data:image/...;base64,...)", param=where)
    else:
        payload = text
    payload = "".join(payload.split())
    if not payload or not _B64_CHARS.match(payload):
        raise ServeError(400, f"{where}: invalid base64 image data", param=where, code="invalid_base64")
    try:
        if "-" in payload or "_" in payload:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        else:
            raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, f"{where}: invalid base64 image data", param=where, code="invalid_base64") from None
    try:
        return load_image(raw, max_pixels, name=where)
    except ImageError as e:
        too_large = "pixel limit" in e.reason
        raise ServeError(
            413 if too_large else 400,
            str(e),
            param=where,
            code="image_too_large" if too_large else "invalid_image",
        ) from None


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ServeError(400, f"{where} must be a string, got {type(value).__name__}", param=where)
    return value


def _images(value: Any, where: str, max_pixels: int) -> list[Image.Image]:
    if value is None:
        return []
    if isinstance(value, list):
        return [decode_image(v, f"{where}[{j}]", max_pixels) for j, v in enumerate(value)]
    return [decode_image(value, where, max_pixels)]


def _from_messages(messages: Any, where: str, placeholder: str, max_pixels: int) -> Item:
    """The chat form: user content parts in order, ``system`` text as the instruction."""
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, f"{where}.messages must be a non-empty list of messages", param=f"{where}.messages")
    seq: list[str | None] = []  # user text parts in order, None where an image stands
    images: list[Image.Image] = []
    system: list[str] = []
    for m, msg in enumerate(messages):
        at = f"{where}.messages[{m}]"
        if not isinstance(msg, dict):
            raise ServeError(400, f"{at} must be an object with 'role' and 'content'", param=at)
        role, content = msg.get("role", "user"), msg.get("content")
        if role not in ("user", "system"):
            raise ServeError(400, f"{at}.role must be 'user' or 'system', got {role!r}", param=f"{at}.role")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ServeError(400, f"{at}.content must be a string or a list of parts", param=f"{at}.content")
        for p, part in enumerate(parts):
            pat = f"{at}.content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = _text(part.get("text"), f"{pat}.text") or ""
                (system if role == "system" else seq).append(text)
            elif kind in ("image_url", "image"):
                if role == "system":
                    raise ServeError(400, f"{pat}: a system message holds text only", param=pat)
                url = part.get(kind)
                url = url.get("url") if isinstance(url, dict) else url
                images.append(decode_image(url, f"{pat}.{kind}.url" if kind == "image_url" else pat, max_pixels))
                seq.append(None)
            else:
                raise ServeError(400, f"{pat}.type must be 'text' or 'image_url', got {kind!r}", param=f"{pat}.type")
    kept = [s for s in seq if s is None or s.strip()]
    first_text = next((i for i, s in enumerate(kept) if s is not None), len(kept))
    interleaved = any(s is None for s in kept[first_text:])  # an image after some text: keep it there
    words = [placeholder if s is None else s.strip() for s in kept if interleaved or s is not None]
    text = " ".join(words) or None
    instruction = "\n".join(s.strip() for s in system if s.strip()) or None
    return Item(text=text, images=images, instruction=instruction)


def parse_item(value: Any, where: str, placeholder: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Item:
    """One input item: a string, ``{"text", "image", "instruction"}`` or ``{"messages": [...]}``.

    Raises:
        ServeError: 400 naming ``where`` (e.g. ``input[3]``) and what is wrong; 413 for an image over the limit.
    """
    if isinstance(value, str):
        item = Item(text=value)
    elif isinstance(value, dict):
        if "messages" in value:
            unknown = set(value) - {"messages"}
            if unknown:
                raise ServeError(400, f"{where}: unknown field(s) {sorted(unknown)} beside 'messages'", param=where)
            item = _from_messages(value["messages"], where, placeholder, max_pixels)
        else:
            allowed = {"text", "image", "images", "instruction"}
            unknown = set(value) - allowed
            if unknown:
                raise ServeError(
                    400,
                    f"{where}: unknown field(s) {sorted(unknown)}; an input object has "
                    f"'text', 'image' (data: URL or a list of them), 'instruction', or else 'messages'",
                    param=where,
                )
            images = _images(value.get("image"), f"{where}.image", max_pixels)
            images += _images(value.get("images"), f"{where}.images", max_pixels)
            item = Item(
                text=_text(value.get("text"), f"{where}.text"),
                images=images,
                instruction=_text(value.get("instruction"), f"{where}.instruction"),
            )
    elif isinstance(value, int) and not isinstance(value, bool):
        raise ServeError(400, f"{where}: token-id input is not supported; send text", param=where)
    else:
        raise ServeError(
            400,
            f"{where} must be a string or an object with 'text'/'image' or 'messages', got {type(value).__name__}",
            param=where,
        )
    if not (item.text and item.text.strip()) and not item.images:
        raise ServeError(400, f"{where} is empty: give non-empty text, an image, or both", param=where)
    return item


def parse_input(
    value: Any, placeholder: str, *, max_inputs: int = 2048, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Item]:
    """OpenAI's ``input`` (a string, or a list of strings / input objects) -> one :class:`Item` per row.

    Raises:
        ServeError: 400 for empty or malformed input (naming ``input[i]``), more than ``max_inputs`` rows, or token
            ids; 413 for an image over ``max_pixels``.
    """
    if value is None:
        raise ServeError(400, "'input' is required", param="input")
    if isinstance(value, (str, dict)):
        return [parse_item(value, "input", placeholder, max_pixels)]
    if not isinstance(value, list):
        raise ServeError(400, f"'input' must be a string or a list, got {type(value).__name__}", param="input")
    if not value:
        raise ServeError(400, "'input' is an empty list", param="input")
    if len(value) > max_inputs:
        raise ServeError(400, f"'input' has {len(value)} items, more than the limit {max_inputs}", param="input")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or all(isinstance(v, list) for v in value):
        raise ServeError(400, "token-id input is not supported; send text", param="input")
    return [parse_item(v, f"input[{i}]", placeholder, max_pixels) for i, v in enumerate(value)]

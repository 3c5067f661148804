"""Row formats -> :class:`Sample` / :class:`EvalExample` (docs/mmeb.md §1.3-1.4, docs/mmeb_parsing.md).

Formats (detected from the column names, or named explicitly):

- ``mmeb_train``: ``qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]``.
  ``qry`` holds the instruction joined with the text; it stays text unless a manifest instruction
  says which inline prefix to strip (see :mod:`mmembed.data.instructions`). ``neg_*`` may be a string
  (one negative) or a list.
- ``mmeb_eval``: ``qry_text, qry_img_path, tgt_text[list], tgt_img_path[list]``, positive first
  (``TIGER-Lab/MMEB-eval``, read as VLM2Vec-V1 reads it).
- ``mmeb_eval_instruct``: the same plus ``qry_inst`` and ``tgt_inst`` (``ziyjiang/MMEB_Test_Instruct``, read as
  VLM2Vec-V2 reads it: per-family rules of :mod:`mmembed.data.mmeb_rules` for the MMEB datasets).
- ``pairs``: mmembed's own JSONL (docs/data.md): ``{"query": SIDE, "positive": SIDE,
  "negatives": [SIDE, ...], "dataset"?: str}`` where SIDE is a string (text only) or
  ``{"text"?: str, "image"?: str, "images"?: [str], "instruction"?: str}``.

MMEB texts are kept as VLM2Vec keeps them (V1 ``src/dataset.py`` and V2 ``mmeb_dataset.py`` only swap the image
token): trailing whitespace and newlines stay, because a last-token-pooled model sees them. The MMEB placeholder
``<|image_N|>`` is replaced by the backbone's placeholder (a parameter); it is dropped when the side has no image.
Image paths are resolved against ``image_root``. Parsers raise :class:`BadSample` for a missing or mistyped field
or an empty side.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.data.mmeb_rules import EvalRule, rule_for
from mmembed.data.sample import Side
from mmembed.data.skips import BadSample

__all__ = [
    "FORMATS",
    "MMEB_PLACEHOLDER",
    "EvalExample",
    "ParseOptions",
    "detect_format",
    "parse_row",
    "parse_eval_row",
    "convert_text",
    "content_key",
    "candidate_key",
    "EvalRowParts",
    "eval_row_parts",
]

MMEB_PLACEHOLDER = "<|image_1|>"
_MMEB_TOKEN = re.compile(r"<\|image_\d+\|>")
FORMATS = ("mmeb_train", "mmeb_eval", "mmeb_eval_instruct", "pairs")
TRAIN_FORMATS = ("mmeb_train", "pairs")
EVAL_FORMATS = ("mmeb_eval", "mmeb_eval_instruct")


@dataclass
class EvalExample:
    """One MMEB-style eval query ranked against its own candidate list; the positive is index 0.

    ``candidate_keys[i]`` identifies candidate i by content (text and image path) so eval code can
    de-duplicate candidates shared between queries before encoding (VLM2Vec ``cand_name``).
    """

    query: Side
    candidates: list[Side]
    dataset: str = ""
    source: str = ""
    candidate_keys: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    positive: int = 0  # always 0 in MMEB files; kept explicit for readers of the eval code


@dataclass
class ParseOptions:
    """How to turn a row into sides.

    Attributes:
        placeholder: the backbone's image placeholder that replaces ``<|image_N|>``.
        image_root: folder that relative image paths are resolved against.
        max_text_chars: longer texts are cut to this many characters (``meta["text_truncated"]``);
            the tokenizer truncates to ``model.max_length`` anyway, this only bounds memory and time.
        dataset: the dataset's name; for instructed eval rows it picks VLM2Vec-V2's parser family
            (:func:`mmembed.data.mmeb_rules.family_of`).
        family: the eval family to use instead (``image_cls``, ..., or ``generic``; a manifest's ``family``).
    """

    placeholder: str = "<image>"
    image_root: str | Path = "."
    max_text_chars: int = 20_000
    dataset: str = ""
    family: str | None = None


def detect_format(columns: list[str] | set[str], where: str = "") -> str:
    """Name the format from the column/field names; raises ValueError naming what was seen."""
    cols = set(columns)
    if {"qry", "pos_text"} <= cols:
        return "mmeb_train"
    if {"qry_inst", "tgt_inst", "qry_text", "tgt_text"} <= cols:
        return "mmeb_eval_instruct"
    if {"qry_text", "tgt_text"} <= cols:
        return "mmeb_eval"
    if {"query", "positive"} <= cols:
        return "pairs"
    raise ValueError(
        f"{where}: cannot tell the format from the fields {sorted(cols)}; expected MMEB-train "
        "(qry, pos_text, ...), MMEB-eval (qry_text, tgt_text, ...) or pairs (query, positive, ...)"
    )


def content_key(side: Side) -> int:
    """A 63-bit id of a side's content (instruction, text, image paths or bytes).

    Equal ids mean identical targets (e.g. the same class label for two queries of a batch), which
    the loss may mask as false in-batch negatives. Computed before decoding, so paths identify images.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update((side.instruction or "").encode())
    h.update(b"\x00")
    h.update((side.text or "").encode())
    for im in side.images:
        h.update(b"\x00")
        if isinstance(im, (str, os.PathLike)):
            h.update(str(im).encode())
        elif isinstance(im, (bytes, bytearray)):
            h.update(hashlib.blake2b(bytes(im), digest_size=8).digest())
        else:
            h.update(im.tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


# ----------------------------------------------------------------------------------------------
# Field access with precise errors


def _get(row: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool) -> Any:
    if key not in row or row[key] is None:
        if required:
            raise BadSample("missing_field", f"field '{key}' is missing (expected {_kind_name(kind)})")
        return None
    value = row[key]
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return None
    if not isinstance(value, kind):
        raise BadSample("bad_field", f"field '{key}': expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", list: "a list", dict: "an object"}.get(k, k.__name__) for k in kinds)


def _str_list(row: dict[str, Any], key: str, required: bool) -> list[str | None]:
    value = _get(row, key, (str, list, tuple), required)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    for j, v in enumerate(items):
        if v is not None and not isinstance(v, str):
            raise BadSample("bad_field", f"field '{key}[{j}]': expected a string, got {type(v).__name__}")
    return items


def convert_text(text: str | None, has_image: bool, placeholder: str, strip: bool = True) -> str | None:
    """Replace MMEB's ``<|image_N|>`` by ``placeholder`` (or drop it when the side has no image).

    With ``strip=False`` (the MMEB formats) trailing whitespace is kept and leading whitespace is removed only
    where a dropped marker left it; a text of whitespace only is None either way.
    """
    if text is None:
        return None
    text = _MMEB_TOKEN.sub(placeholder if has_image else "", text)
    if strip:
        text = text.strip()
    elif not has_image:
        text = text.lstrip()
    return text if text.strip() else None


def _strip_marker(instruction: str | None) -> str | None:
    # the image's place comes from the layout: an instruction's own <|image_N|> would reach the model as text
    # after the image (VLM2Vec's eval parsers strip it too)
    return (_MMEB_TOKEN.sub("", instruction).strip() or None) if instruction else None


def _side(
    text: str | None,
    images: list[str | None],
    opts: ParseOptions,
    what: str,
    instruction: str | None = None,
    strip: bool = True,
) -> tuple[Side, bool]:
    paths = [_resolve(p, opts.image_root) for p in images if p]
    text = convert_text(text, bool(paths), opts.placeholder, strip)
    cut = False
    if text is not None and len(text) > opts.max_text_chars:
        text, cut = text[: opts.max_text_chars], True
    side = Side(instruction=_strip_marker(instruction), text=text, images=paths)
    if side.is_empty():
        raise BadSample("empty_text", f"{what} has neither text nor an image")
    return side, cut


def _resolve(path: str, root: str | Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else Path(root) / p)


# ----------------------------------------------------------------------------------------------
# Training rows


def parse_row(row: dict[str, Any], fmt: str, opts: ParseOptions) -> tuple[Side, Side, list[Side], dict[str, Any]]:
    """One training row -> (query, positive, negatives, meta). Raises :class:`BadSample`.

    ``meta["text_truncated"]`` is set when a text was longer than ``opts.max_text_chars``.
    """
    if not isinstance(row, dict):
        raise BadSample("bad_field", f"expected a JSON object per row, got {type(row).__name__}")
    if fmt == "mmeb_train":
        out = _parse_mmeb_train(row, opts)
    elif fmt == "pairs":
        out = _parse_pairs(row, opts)
    elif fmt in EVAL_FORMATS:
        raise BadSample("bad_format", f"format {fmt} is an eval format; read it with read_eval_set")
    else:
        raise BadSample("bad_format", f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return out


def _parse_mmeb_train(row: dict[str, Any], opts: ParseOptions):
    cut = []
    # a list of image paths (several images in one side) is accepted for the query and the positive
    # texts as VLM2Vec trains on them (mmeb_dataset.py data_prepare_v4: only the image token is swapped)
    q, c = _side(_get(row, "qry", str, True), _str_list(row, "qry_image_path", False), opts, "query", strip=False)
    cut.append(c)
    p, c = _side(
        _get(row, "pos_text", str, True), _str_list(row, "pos_image_path", False), opts, "positive", strip=False
    )
    cut.append(c)
    neg_t, neg_i = _str_list(row, "neg_text", False), _str_list(row, "neg_image_path", False)
    if neg_t and neg_i and len(neg_t) != len(neg_i):
        raise BadSample("bad_field", f"neg_text has {len(neg_t)} entries but neg_image_path has {len(neg_i)}")
    negatives = []
    for j in range(max(len(neg_t), len(neg_i))):
        t = neg_t[j] if j < len(neg_t) else None
        i = neg_i[j] if j < len(neg_i) else None
        if not (t and t.strip()) and not i:
            continue  # an empty negative slot means "no negative"
        n, c = _side(t, [i], opts, f"negative {j}", strip=False)
        negatives.append(n)
        cut.append(c)
    return q, p, negatives, {"text_truncated": True} if any(cut) else {}


def _pairs_side(value: Any, key: str, opts: ParseOptions) -> tuple[Side, bool]:
    if isinstance(value, str):
        return _side(value, [], opts, key)
    if not isinstance(value, dict):
        raise BadSample("bad_field", f"field '{key}': expected a string or an object, got {type(value).__name__}")
    unknown = set(value) - {"text", "image", "images", "instruction"}
    if unknown:
        raise BadSample(
            "bad_field", f"field '{key}': unknown keys {sorted(unknown)}; allowed text, image(s), instruction"
        )
    images = _str_list(value, "images", False) + _str_list(value, "image", False)
    text = _get(value, "text", str, False)
    return _side(text, images, opts, key, instruction=_get(value, "instruction", str, False))


def _parse_pairs(row: dict[str, Any], opts: ParseOptions):
    if "query" not in row or row["query"] is None:
        raise BadSample("missing_field", "field 'query' is missing (expected a string or an object)")
    if "positive" not in row or row["positive"] is None:
        raise BadSample("missing_field", "field 'positive' is missing (expected a string or an object)")
    q, c1 = _pairs_side(row["query"], "query", opts)
    p, c2 = _pairs_side(row["positive"], "positive", opts)
    negs = _get(row, "negatives", list, False) or []
    negatives, cuts = [], [c1, c2]
    for j, n in enumerate(negs):
        side, c = _pairs_side(n, f"negatives[{j}]", opts)
        negatives.append(side)
        cuts.append(c)
    meta = {"text_truncated": True} if any(cuts) else {}
    if isinstance(row.get("dataset"), str):
        meta["dataset"] = row["dataset"]
    return q, p, negatives, meta


# ----------------------------------------------------------------------------------------------
# Eval rows


def parse_eval_row(row: dict[str, Any], fmt: str, opts: ParseOptions) -> EvalExample:
    """One MMEB-eval row (plain or instructed) -> :class:`EvalExample`. Raises :class:`BadSample`.

    ``mmeb_eval`` rows are read as VLM2Vec-V1 reads them: texts as they are, no instruction. ``mmeb_eval_instruct``
    rows follow VLM2Vec-V2's parser for the dataset's family (``opts.family``, else the family of ``opts.dataset``;
    :mod:`mmembed.data.mmeb_rules`); rows of other datasets get the generic rule: ``qry_inst`` on the query,
    ``tgt_inst`` on every candidate, no suffix.
    """
    p = eval_row_parts(row, fmt, opts)
    candidates, keys, cut = [], [], p.cut
    for j, t in enumerate(p.texts):
        i = p.images[j] if p.images else None
        side, c = p.make(j, t, i)
        candidates.append(side)
        keys.append(candidate_key(t, i))
        cut = cut or c
    meta = {"text_truncated": cut, **p.meta}
    return EvalExample(query=p.query, candidates=candidates, candidate_keys=keys, meta=meta)


def candidate_key(text: str | None, image: str | None) -> str:
    """:attr:`EvalExample.candidate_keys` entry of a candidate from its raw fields (VLM2Vec ``cand_name``)."""
    return f"{text or ''}\x00{image or ''}"


@dataclass
class EvalRowParts:
    """An eval row parsed up to its candidates (what :func:`parse_eval_row` and the table reader share).

    ``make(j, text, image)`` builds candidate ``j`` (``(side, text cut)``; raises :class:`BadSample` naming
    ``candidate j``) from its raw fields ``texts[j]`` and ``images[j]`` (``images`` None: no candidate images).
    Beyond those it depends only on the file's options and on ``context`` (hashable), so a reader may reuse the
    side built for an equal ``(context, text, image)`` of the same file.
    """

    query: Side
    cut: bool
    texts: list[str | None]
    images: list[str | None] | None
    context: tuple
    make: Callable[[int, str | None, str | None], tuple[Side, bool]]
    meta: dict[str, Any]


def eval_row_parts(row: dict[str, Any], fmt: str, opts: ParseOptions) -> EvalRowParts:
    """Parse an eval row's query and candidate fields (:class:`EvalRowParts`). Raises :class:`BadSample`."""
    if not isinstance(row, dict):
        raise BadSample("bad_field", f"expected a JSON object per row, got {type(row).__name__}")
    if fmt not in EVAL_FORMATS:
        raise BadSample("bad_format", f"format {fmt!r} is not an eval format ({', '.join(EVAL_FORMATS)})")
    texts, imgs = _candidate_fields(row)
    instructed = fmt == "mmeb_eval_instruct"
    rule = rule_for(opts.family, opts.dataset) if instructed else None
    if rule is not None:
        return _parse_v2(row, texts, imgs, rule, opts)
    q_inst = _get(row, "qry_inst", str, False) if instructed else None
    t_inst = _get(row, "tgt_inst", str, False) if instructed else None
    strip = instructed  # V1 texts stay as they are (src/dataset.py EvalDataset.__getitem__, v1 branch)
    q_imgs = _str_list(row, "qry_img_path", False)
    query, cut = _side(_get(row, "qry_text", str, False), q_imgs, opts, "query", q_inst, strip=strip)

    def make(j: int, t: str | None, i: str | None) -> tuple[Side, bool]:
        return _side(t, [i], opts, f"candidate {j}", instruction=t_inst, strip=strip)

    return EvalRowParts(query, cut, texts, imgs or None, ("v1", t_inst, strip), make, {})


def _candidate_fields(row: dict[str, Any]) -> tuple[list[str | None], list[str | None]]:
    texts = _str_list(row, "tgt_text", True)
    if isinstance(row.get("tgt_text"), str):
        raise BadSample("bad_field", "field 'tgt_text': expected a list of candidates, got a string")
    imgs = _str_list(row, "tgt_img_path", False)
    if imgs and len(imgs) != len(texts):
        raise BadSample("bad_field", f"tgt_text has {len(texts)} candidates but tgt_img_path has {len(imgs)}")
    if not texts:
        raise BadSample("missing_field", "field 'tgt_text' has no candidates")
    return texts, imgs


def _v2_side(instruction: str | None, text: str, images: list[str], opts: ParseOptions, what: str) -> tuple[Side, bool]:
    """A side whose text already carries VLM2Vec-V2's suffix (so it is never stripped)."""
    cut = len(text) > opts.max_text_chars
    text = text[: opts.max_text_chars] if cut else text
    side = Side(instruction=_strip_marker(instruction), text=text or None, images=images)
    if side.is_empty():
        raise BadSample("empty_text", f"{what} has neither text nor an image")
    return side, cut


def _parse_v2(
    row: dict[str, Any], texts: list[str | None], imgs: list[str | None], rule: EvalRule, opts: ParseOptions
) -> EvalRowParts:
    """An instructed row as VLM2Vec-V2's ``rule.family`` parser builds it (docs/mmeb_parsing.md)."""
    q_paths = [_resolve(p, opts.image_root) for p in _str_list(row, "qry_img_path", False) if p]
    q_paths = q_paths if rule.query_image else []  # image_t2i_eval.py: query_images = [None]
    q_text = convert_text(_get(row, "qry_text", str, False), bool(q_paths), opts.placeholder, strip=False) or ""
    if rule.squash_newline:
        q_text = q_text.replace(" \n", "\n")
    query, cut = _v2_side(_get(row, "qry_inst", str, False), q_text + rule.query_suffix, q_paths, opts, "query")
    t_inst = _get(row, "tgt_inst", str, False)
    # image_t2i_eval.py / image_i2i_vg_dataset.py: "if tgt_captions[0].strip()", decided once per row
    captions = rule.image_candidates and bool(convert_text(texts[0], False, "", strip=True))

    def make(j: int, t: str | None, path: str | None) -> tuple[Side, bool]:
        paths = [_resolve(path, opts.image_root)] if path else []
        if not rule.image_candidates:  # cls / qa / i2t: the label text alone
            text = convert_text(t, False, opts.placeholder, strip=False) or ""
            return _v2_side(None, text, [], opts, f"candidate {j}")
        if captions:
            body = (convert_text(t, bool(paths), opts.placeholder, strip=False) or "").replace(" \n", "\n")
            return _v2_side(t_inst, body + rule.caption_suffix, paths, opts, f"candidate {j}")
        return _v2_side(t_inst, rule.image_only_suffix, paths, opts, f"candidate {j}")

    images = imgs if imgs and rule.image_candidates else None
    meta = {"eval_family": rule.family}
    return EvalRowParts(query, cut, texts, images, ("v2", t_inst, captions), make, meta)

"""VLM2Vec-V2's per-family rules for instructed MMEB eval rows (docs/mmeb_parsing.md has the full table).

VLM2Vec-V2 reads the instructed MMEB eval rows (``ziyjiang/MMEB_Test_Instruct``: ``qry_inst, qry_text,
qry_img_path, tgt_inst, tgt_text[], tgt_img_path[]``) with one of five parsers, picked per dataset in
``experiments/public/eval/image.yaml`` (TIGER-AI-Lab/VLM2Vec, HEAD 6e1e1d4):

- ``image_cls`` (``src/data/eval_dataset/image_cls_dataset.py``), ``image_qa`` (``image_qa_dataset.py``) and
  ``image_i2t`` (``image_i2t_eval.py``): the query is ``<image> qry_inst qry_text`` plus ``"\\n"``; the candidates
  are the ``tgt_text`` strings as they are: no ``tgt_inst``, no image;
- ``image_t2i`` (``image_t2i_eval.py``): the query is text only (``qry_img_path`` is not read) plus ``"\\n"``
  (``"\\n\\n"`` for VisDial); each candidate is its image with ``tgt_inst``, plus its caption when the row's first
  ``tgt_text`` is not blank (WebQA, EDIS), then ``"\\n"``;
- ``image_i2i_vg`` (``image_i2i_vg_dataset.py``): the query as ``image_qa``; candidates as ``image_t2i``, except that
  an image-only candidate gets no ``"\\n"``.

``image_qa`` and ``image_i2i_vg`` put a newline between the image token and the instruction (``"\\n" + qry_inst``)
where ``image_cls``/``image_i2t`` put a space; where the image token goes is the processor's layout
(``mmembed.types.layout_side``), so :class:`EvalRule` records it (``image_newline``) for the docs and the report.

Lookups ignore case and treat ``_``/``-`` alike, so the training name ``ImageNet_1K`` finds ``ImageNet-1K``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["EvalRule", "FAMILIES", "GENERIC", "PARSER_OF", "family_of", "rule_for"]

GENERIC = "generic"  # mmembed's own rule for instructed rows of other datasets: both instructions, no suffix

#: dataset -> VLM2Vec-V2 parser (``experiments/public/eval/image.yaml``), for the 36 MMEB-V1 image datasets
_BY_PARSER = {
    "image_cls": (
        "ImageNet-1K",
        "N24News",
        "HatefulMemes",
        "VOC2007",
        "SUN397",
        "Place365",
        "ImageNet-A",
        "ImageNet-R",
        "ObjectNet",
        "Country211",
    ),
    "image_qa": (
        "OK-VQA",
        "A-OKVQA",
        "DocVQA",
        "InfographicsVQA",
        "ChartQA",
        "Visual7W",
        "ScienceQA",
        "VizWiz",
        "GQA",
        "TextVQA",
    ),
    "image_i2t": ("MSCOCO_i2t", "VisualNews_i2t"),
    "image_t2i": ("VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"),
    "image_i2i_vg": (
        "CIRR",
        "NIGHTS",
        "OVEN",
        "FashionIQ",
        "MSCOCO",
        "RefCOCO",
        "RefCOCO-Matching",
        "Visual7W-Pointing",
    ),
}
PARSER_OF: dict[str, str] = {name: parser for parser, names in _BY_PARSER.items() for name in names}
FAMILIES = (*_BY_PARSER, GENERIC)


@dataclass(frozen=True)
class EvalRule:
    """How one VLM2Vec-V2 parser builds the query and the candidates of an instructed MMEB row.

    Attributes:
        family: the parser name (``image_cls``, ...).
        query_image: the query keeps ``qry_img_path`` (``image_t2i`` drops it).
        image_newline: ``"<image>\\n<inst>"`` rather than ``"<image> <inst>"`` (see the module doc).
        squash_newline: ``" \\n"`` becomes ``"\\n"`` in the query text (every parser but ``image_t2i``).
        query_suffix: appended to the query text.
        image_candidates: candidates are ``tgt_img_path`` images with ``tgt_inst`` (and the caption when the
            first ``tgt_text`` is not blank); otherwise the ``tgt_text`` strings alone.
        caption_suffix: appended to a captioned image candidate.
        image_only_suffix: the text of an image-only candidate (besides its instruction).
    """

    family: str
    query_image: bool = True
    image_newline: bool = False
    squash_newline: bool = True
    query_suffix: str = "\n"
    image_candidates: bool = False
    caption_suffix: str = "\n"
    image_only_suffix: str = ""


_RULES = {
    "image_cls": EvalRule("image_cls"),
    "image_qa": EvalRule("image_qa", image_newline=True),
    "image_i2t": EvalRule("image_i2t"),
    "image_t2i": EvalRule(
        "image_t2i", query_image=False, squash_newline=False, image_candidates=True, image_only_suffix="\n"
    ),
    "image_i2i_vg": EvalRule("image_i2i_vg", image_newline=True, image_candidates=True),
}
#: per-dataset exceptions inside a parser (``image_t2i_eval.py``: VisDial's query gets a second newline)
_OVERRIDES = {"visdial": {"query_suffix": "\n\n"}}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


_PARSER_BY_NORM = {_norm(n): p for n, p in PARSER_OF.items()}


def family_of(name: str) -> str | None:
    """The VLM2Vec-V2 parser of MMEB dataset ``name`` (``"ImageNet_1K"`` -> ``"image_cls"``); None if not MMEB."""
    return _PARSER_BY_NORM.get(_norm(name or ""))


def rule_for(family: str | None, dataset: str = "") -> EvalRule | None:
    """The rule for ``family`` (default: the family of ``dataset``); None means mmembed's generic rule.

    Raises:
        ValueError: an unknown family name (the message lists the known ones).
    """
    family = family or family_of(dataset)
    if family is None or family == GENERIC:
        return None
    if family not in _RULES:
        raise ValueError(f"unknown eval family {family!r}; known: {', '.join(FAMILIES)}")
    rule = _RULES[family]
    over = _OVERRIDES.get(_norm(dataset)) if family == family_of(dataset) else None
    return replace(rule, **over) if over else rule

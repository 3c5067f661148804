"""Per-dataset instructions from the dataset manifest, with deterministic paraphrase sampling.

A manifest entry may give ``query_instruction`` and ``target_instruction``, each a string or a list
of paraphrases. For each sample one paraphrase is picked from ``hash(seed, dataset, row, side)``, so the choice
is the same in every worker, rank and resumed run. (MMEB-train's own paraphrases, its ``diverse_instruction``
split, are whole rows read instead of ``original`` with a manifest ``split:``, as VLM2Vec reads them;
see :mod:`mmembed.data.manifest`.)

MMEB-train ``qry`` texts carry their instruction inline (``"<|image_1|> Represent the given image for
classification."``). When a manifest instruction is set, an inline instruction is removed from the
front of the text if it matches ``inline_instruction`` (string or list) or one of the paraphrases;
otherwise the text is kept whole. An instruction given in the row itself (MMEB-eval ``qry_inst``,
pairs ``"instruction"``) always wins over the manifest.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

from mmembed.data.sample import Side

__all__ = ["Instructions", "strip_inline"]


def _as_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{key}: expected a string or a list of strings, got {value!r}")


def strip_inline(text: str | None, prefixes: list[str], placeholder: str) -> str | None:
    """Remove the first matching instruction prefix that follows any leading image placeholders.

    ``"<image> Represent the given image for classification. cat"`` with prefix
    ``"Represent the given image for classification."`` -> ``"<image> cat"``.
    """
    if not text or not prefixes:
        return text
    lead = re.match(r"^(\s*" + re.escape(placeholder) + r")*\s*", text) if placeholder else None
    head = lead.group(0) if lead else ""
    rest = text[len(head) :]
    for p in sorted(prefixes, key=len, reverse=True):
        p = p.strip()
        if p and rest.startswith(p):
            rest = rest[len(p) :].lstrip(" \n\t:")
            out = (head.strip() + " " + rest).strip()
            return out or None
    return text


@dataclass
class Instructions:
    """Query/target instruction paraphrases for one dataset.

    Attributes:
        query: paraphrases for the query side (empty: leave the query as it is).
        target: paraphrases for positive and negatives (the same pick for all targets of a sample).
        inline: extra prefixes to strip from the query text when a query instruction is applied.
    """

    query: list[str] = field(default_factory=list)
    target: list[str] = field(default_factory=list)
    inline: list[str] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], where: str = "") -> Instructions:
        return cls(
            query=_as_list(entry.get("query_instruction"), f"{where}.query_instruction"),
            target=_as_list(entry.get("target_instruction"), f"{where}.target_instruction"),
            inline=_as_list(entry.get("inline_instruction"), f"{where}.inline_instruction"),
        )

    def __bool__(self) -> bool:
        return bool(self.query or self.target)

    @staticmethod
    def pick(options: list[str], seed: int, dataset: str, index: int, side: str) -> str | None:
        """One of ``options``, chosen by a stable hash of (seed, dataset, index, side)."""
        if not options:
            return None
        if len(options) == 1:
            return options[0]
        h = zlib.crc32(f"{seed}\x00{dataset}\x00{index}\x00{side}".encode())
        return options[h % len(options)]

    def apply(
        self, query: Side, targets: list[Side], *, seed: int, dataset: str, index: int, placeholder: str
    ) -> tuple[Side, list[Side]]:
        """Return new sides with the manifest instructions filled in where the row gave none."""
        q_inst = self.pick(self.query, seed, dataset, index, "query")
        if q_inst is not None and query.instruction is None:
            text = strip_inline(query.text, self.inline + self.query, placeholder)
            query = replace(query, instruction=q_inst, text=text)
        t_inst = self.pick(self.target, seed, dataset, index, "target")
        if t_inst is not None:
            targets = [t if t.instruction is not None else replace(t, instruction=t_inst) for t in targets]
        return query, targets

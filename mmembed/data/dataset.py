"""Map-style access to one dataset (rows -> :class:`Sample`) and reading of eval sets.

:class:`SampleDataset` reads row ``i`` of a dataset (one or several files of one format), applies
the manifest instructions and, with ``load``, decodes the images through
:func:`mmembed.images.load_image` (so, inside a DataLoader, decoding runs in the workers).
A bad row raises :class:`BadSample`; :meth:`SampleDataset.get` turns that into a counted skip.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import replace

from mmembed.data.eval_table import EvalRows, EvalRowsBuilder
from mmembed.data.formats import (
    EVAL_FORMATS,
    TRAIN_FORMATS,
    ParseOptions,
    content_key,
    detect_format,
    parse_eval_row,
    parse_row,
)
from mmembed.data.manifest import DatasetSpec, resolve_datasets
from mmembed.data.sample import Sample, Side
from mmembed.data.skips import BadSample, SkipCounter, image_reason
from mmembed.data.sources import RowSource, open_rows
from mmembed.images import DEFAULT_MAX_PIXELS, ImageError, load_image

__all__ = ["SampleDataset", "decode_side", "decode_sample", "read_eval_set", "iter_samples"]


def decode_side(side: Side, max_pixels: int = DEFAULT_MAX_PIXELS) -> Side:
    """Return the side with every image decoded to an RGB PIL image; raises :class:`BadSample`."""
    if not side.images:
        return side
    try:
        return replace(side, images=[load_image(im, max_pixels) for im in side.images])
    except ImageError as e:
        raise BadSample(image_reason(e), str(e)) from None


def decode_sample(sample: Sample, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
    """Decode all images of a sample (query, positive, negatives); raises :class:`BadSample`."""
    return replace(
        sample,
        query=decode_side(sample.query, max_pixels),
        positive=decode_side(sample.positive, max_pixels),
        negatives=[decode_side(n, max_pixels) for n in sample.negatives],
    )


class SampleDataset:
    """One training dataset, rows addressed by a global index ``0 <= i < len(self)``.

    Args:
        spec: the resolved manifest entry (files, format, image root, cap, instructions).
        placeholder: the backbone's image placeholder (``processor.placeholder``).
        max_pixels: decompression-bomb limit for :func:`load_image`.
        seed: seeds the per-sample instruction paraphrase choice.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        *,
        placeholder: str = "<image>",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        seed: int = 0,
        max_text_chars: int = 20_000,
    ) -> None:
        self.spec, self.name = spec, spec.name
        self.placeholder, self.max_pixels, self.seed = placeholder, max_pixels, seed
        self.max_text_chars = max_text_chars
        self.sources: list[RowSource] = [open_rows(f) for f in spec.files]
        self.formats = []
        for src in self.sources:
            fmt = spec.format or detect_format(src.columns, str(src.path))
            if fmt not in TRAIN_FORMATS:
                raise ValueError(f"{src.path}: format {fmt} cannot be used for training (expected {TRAIN_FORMATS})")
            self.formats.append(fmt)
        self._starts = [0]
        for src in self.sources:
            self._starts.append(self._starts[-1] + len(src))
        total = self._starts[-1]
        self._len = min(total, spec.cap) if spec.cap else total
        if self._len == 0:
            raise ValueError(f"dataset '{self.name}': no rows in {', '.join(str(f) for f in spec.files)}")

    def __len__(self) -> int:
        return self._len

    def locate(self, i: int) -> tuple[int, int]:
        """Global row -> (file number, row within that file)."""
        if not 0 <= i < self._len:
            raise IndexError(f"dataset '{self.name}': row {i} out of range [0, {self._len})")
        f = bisect.bisect_right(self._starts, i) - 1
        return f, i - self._starts[f]

    def where(self, i: int) -> str:
        f, j = self.locate(i)
        return self.sources[f].where(j)

    def parse(self, i: int) -> Sample:
        """Row ``i`` as a Sample with image paths (nothing decoded). Raises :class:`BadSample`."""
        f, j = self.locate(i)
        src = self.sources[f]
        root = self.spec.image_root or src.path.parent
        opts = ParseOptions(placeholder=self.placeholder, image_root=root, max_text_chars=self.max_text_chars)
        q, p, negs, meta = parse_row(src.row(j), self.formats[f], opts)
        if self.spec.instructions:
            q, targets = self.spec.instructions.apply(
                q, [p, *negs], seed=self.seed, dataset=self.name, index=i, placeholder=self.placeholder
            )
            p, negs = targets[0], targets[1:]
        meta["target_keys"] = [content_key(t) for t in (p, *negs)]  # before decoding: paths identify images
        return Sample(query=q, positive=p, negatives=negs, dataset=self.name, source=src.where(j), meta=meta)

    def load(self, i: int) -> Sample:
        """Row ``i`` parsed and with its images decoded. Raises :class:`BadSample`."""
        return decode_sample(self.parse(i), self.max_pixels)

    def get(self, i: int, counter: SkipCounter, decode: bool = True) -> Sample | None:
        """Row ``i``, or None after counting it as skipped (raises DataError when the counter is strict)."""
        try:
            sample = self.load(i) if decode else self.parse(i)
        except BadSample as e:
            counter.skip(self.where(i), e.reason, e.detail)
            return None
        counter.ok()
        if sample.meta.get("text_truncated"):
            counter.event(sample.source, "text_truncated", f"text cut to {self.max_text_chars} chars", False)
        return sample


def iter_samples(
    spec: DatasetSpec, counter: SkipCounter, *, placeholder: str = "<image>", decode: bool = False, **kw
) -> Iterator[Sample]:
    """All good samples of a dataset in row order (bad ones counted and skipped)."""
    ds = SampleDataset(spec, placeholder=placeholder, **kw)
    for i in range(len(ds)):
        s = ds.get(i, counter, decode=decode)
        if s is not None:
            yield s


def read_eval_set(
    path: str | os.PathLike,
    *,
    placeholder: str = "<image>",
    image_root: str | os.PathLike | None = None,
    counter: SkipCounter | None = None,
    max_text_chars: int = 20_000,
    check_images: bool = True,
    keep_missing_images: bool = False,
) -> dict[str, EvalRows]:
    """Read MMEB-eval sets (manifest, directory or file) -> ``{dataset name: EvalRows}`` (a sequence of
    :class:`EvalExample`, stored as index arrays into the set's distinct inputs: :mod:`mmembed.data.eval_table`).

    Images stay as paths (the eval code encodes them through the processor). With
    ``check_images`` a row whose query or candidate image file is missing or empty is skipped and
    counted, because a query ranked against a partial candidate list would inflate its score.
    With ``keep_missing_images`` (what ``mmembed eval`` uses) such a row is kept instead, with
    ``meta["missing_images"]`` naming its sides (``"query"``, ``"candidate 3"``) and an
    ``image_missing`` event counted; the evaluator scores it as a miss, never dropping it from the
    denominator. Manifest instructions fill in ``qry_inst``/``tgt_inst`` when the rows have none.
    A candidate repeated across the rows of a file is parsed and checked once.
    """
    counter = counter if counter is not None else SkipCounter()
    check = None if not check_images else ("mark" if keep_missing_images else "skip")
    out: dict[str, EvalRows] = {}
    for spec in resolve_datasets(path, image_root):
        table = EvalRowsBuilder(spec.name, check)
        for f in spec.files:
            src = open_rows(f)
            fmt = spec.format or detect_format(src.columns, str(src.path))
            if fmt not in EVAL_FORMATS:
                raise ValueError(f"{src.path}: format {fmt} is not an eval format (expected {EVAL_FORMATS})")
            root = spec.image_root or src.path.parent
            opts = ParseOptions(placeholder, root, max_text_chars, dataset=spec.name, family=spec.family)
            n = min(len(src), spec.cap) if spec.cap else len(src)
            table.new_file()
            for j in range(n):
                where = src.where(j)
                try:
                    if spec.instructions:
                        ex = parse_eval_row(src.row(j), fmt, opts)
                        missing = table.check_example(ex)
                    else:
                        missing = table.add_row(src.row(j), fmt, opts, where)
                except BadSample as e:
                    counter.skip(where, e.reason, e.detail)
                    continue
                counter.ok()
                if missing:
                    counter.event(where, "image_missing", missing[0][1], fatal_in_strict=False)
                if spec.instructions:
                    if missing:
                        ex.meta["missing_images"] = [label for label, _ in missing]
                    q, cands = spec.instructions.apply(
                        ex.query, ex.candidates, seed=0, dataset=spec.name, index=j, placeholder=placeholder
                    )
                    table.add_example(replace(ex, query=q, candidates=cands), where)
        out[spec.name] = table.finish()
    return out

"""The processor of native VLM backbones: :class:`~mmembed.types.Side` rows -> the HF processor's batch.

Rows are laid out as VLM2Vec does (``<image tokens> instruction text``, docs/data.md) and handed to the model's
own transformers processor, which resizes images and expands each image text to its visual tokens; videos are
sampled and decoded by :func:`mmembed.video.load_video` and handed over as frames (docs/video.md). Text is
truncated to the budget *before* that expansion, on the text pieces between images only, and the instruction
span is recorded so mean pooling can leave it out, both as the composed model's
:class:`~mmembed.processing.Processor` does (the shared parts live in :mod:`mmembed.processing.base`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmembed.images import DEFAULT_MAX_PIXELS
from mmembed.processing.base import BaseProcessor, keep_counts
from mmembed.types import InputError, Side

__all__ = ["NativeProcessor", "resolve_video_options", "hf_video_kwargs"]


def resolve_video_options(base: Any, override: Any = None) -> Any:
    """The :class:`~mmembed.video.VideoOptions` of one call: ``override`` as it is (a ``VideoOptions``), or its keys
    on top of ``base`` (a mapping; an unknown key raises ``ValueError`` naming it), or ``base`` (``None``)."""
    from mmembed.video import VideoOptions

    if override is None:
        return base if base is not None else VideoOptions()
    if isinstance(override, VideoOptions):
        return override
    if not isinstance(override, Mapping):
        raise TypeError(f"video_options must be a VideoOptions or a mapping, got {type(override).__name__}")
    start = dataclasses.asdict(base) if base is not None else {}
    return VideoOptions.from_mapping({**start, **dict(override)})


def hf_video_kwargs(video_processor: Any, videos: Sequence[Any], options: Any) -> dict[str, Any]:
    """``videos_kwargs`` for the HF processor call on frames mmembed sampled (and maybe resized).

    ``do_sample_frames=False`` (transformers ``BaseVideoProcessor._decode_and_sample_videos`` then keeps every frame
    given) and ``video_metadata`` with the source's rate, frame count and the sampled indices (Qwen3-VL writes each
    frame pair's timestamp, ``Qwen3VLProcessor.replace_video_token``; Qwen2.5-VL derives ``second_per_grid_ts``).
    A video processor that resizes to a multiple of its patch grid (Qwen's ``smart_resize``: ``patch_size`` and
    ``merge_size``) gets ``do_resize=False`` when the options resized the frames already (their ``factor`` must be a
    multiple of ``patch_size * merge_size``); without pixel budgets it resizes with its own ``size``.
    """
    kw: dict[str, Any] = {
        "do_sample_frames": False,
        "video_metadata": [
            {
                "total_num_frames": int(v.total_frames),
                "fps": v.source_fps,
                "frames_indices": [int(i) for i in v.indices],
                "height": int(v.frames.shape[1]),
                "width": int(v.frames.shape[2]),
            }
            for v in videos
        ],
    }
    patch, merge = getattr(video_processor, "patch_size", None), getattr(video_processor, "merge_size", None)
    if patch and merge and options.resizes:
        unit = int(patch) * int(merge)
        if options.factor % unit:
            raise ValueError(
                f"video factor={options.factor} must be a multiple of the model's patch_size * merge_size = {unit}"
            )
        kw["do_resize"] = False
    if hasattr(video_processor, "cap_pixels_per_frame") and video_processor.cap_pixels_per_frame is None:
        kw["cap_pixels_per_frame"] = False  # transformers' current default, without its deprecation warning
    return kw


class NativeProcessor(BaseProcessor):
    """:class:`~mmembed.types.Side` rows -> the HF processor's batch for a native VLM.

    Each mmembed placeholder (``<image>``) becomes the model's own image text (``image_text``: Qwen2-VL's
    ``<|vision_start|><|image_pad|><|vision_end|>``, LLaVA's ``<image>``); the HF processor then expands it to
    the per-image token count (which varies per image for Qwen2-VL's dynamic resolution).

    Args:
        hf_processor: a transformers processor (``Qwen2VLProcessor``, ``LlavaProcessor``, ...).
        image_text: the text the HF processor expects per image.
        lead_text: the text of each image that starts a row (default ``image_text``; ``layout: vlm2vec`` puts
            VLM2Vec's ``"<|image_pad|> "`` there, docs/mmeb.md).
        text_positions: add ``position_ids`` (B, L), ``cumsum(attention_mask) - 1`` over every token, image tokens
            included (``layout: vlm2vec`` on Qwen2-VL: VLM2Vec's sequence has no vision-start marker, so its
            Qwen2-VL numbers the image tokens as text).
        join_as_vlm2vec: ``instruction + " " + text`` even when the instruction is empty (``layout: vlm2vec``).
        image_token_id: the model's image token id (``config.image_token_id``).
        placeholder: mmembed's placeholder in texts.
        image_tokens: visual tokens per image, an estimate for length grouping (exact for LLaVA).
        padding_side: ``left`` (VLM2Vec's Qwen2-VL setting) or ``right``.
        add_eos: append the tokenizer's EOS so last-token pooling reads it.
        max_pixels: refuse larger images before decoding (decompression-bomb guard, not the resize budget).
        max_images: most images in one row.
        max_length: text-token budget per row, counting the BOS the tokenizer adds and the EOS; image tokens and
            the image text's own markup (Qwen's ``<|vision_start|>`` / ``<|vision_end|>``) come on top and are
            never cut. Longer texts lose their end (one warning per processor), as in the composed processor.
        image_keys: per-image tensors of the batch besides ``pixel_values`` (``image_grid_thw``, ``image_sizes``).
        patch_grid_key: the (N_img, 3) key giving each image's flattened-patch rows (Qwen2-VL's ``image_grid_thw``).
        video_text: the text the HF processor expects per video (Qwen's
            ``<|vision_start|><|video_pad|><|vision_end|>``, LLaVA-OneVision's ``<video>``); ``None``: no video input.
        video_token_id: the model's video token id (``config.video_token_id``).
        video_options: how videos are sampled and resized (:class:`mmembed.video.VideoOptions`), per call overridable.
        video_tokens: visual tokens per video, an estimate for length grouping.
        video_keys, video_grid_key: as ``image_keys`` / ``patch_grid_key``, for ``pixel_values_videos``.
    """

    transform = None  # no mmembed image transform: the HF image processor resizes and normalizes

    def __init__(
        self,
        hf_processor: Any,
        image_text: str,
        image_token_id: int,
        placeholder: str = "<image>",
        image_tokens: int = 0,
        padding_side: str = "left",
        add_eos: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_images: int = 8,
        max_length: int = 512,
        image_keys: tuple[str, ...] = (),
        patch_grid_key: str | None = None,
        lead_text: str | None = None,
        text_positions: bool = False,
        join_as_vlm2vec: bool = False,
        video_text: str | None = None,
        video_token_id: int | None = None,
        video_options: Any = None,
        video_tokens: int = 0,
        video_keys: tuple[str, ...] = (),
        video_grid_key: str | None = None,
    ) -> None:
        self.hf_processor = hf_processor
        self.lead_text = image_text if lead_text is None else lead_text
        self.text_positions = bool(text_positions)
        self.join_as_vlm2vec = bool(join_as_vlm2vec)
        self.image_keys, self.patch_grid_key = tuple(image_keys), patch_grid_key
        self.video_text = video_text
        self.video_token_id = int(video_token_id) if video_token_id is not None else None
        self.video_options = video_options if video_text is not None else None
        self.video_tokens = int(video_tokens)
        self.video_keys, self.video_grid_key = tuple(video_keys), video_grid_key
        self.tokenizer = tok = hf_processor.tokenizer
        self.image_text = image_text
        self.placeholder = placeholder
        self.placeholder_id = int(image_token_id)
        self.image_tokens = int(image_tokens)
        self.padding_side = padding_side
        self.max_pixels = int(max_pixels)
        self.max_images = int(max_images)
        self.max_length = int(max_length)
        eos = tok.eos_token
        self.suffix = eos if add_eos and eos is not None else ""
        self.n_suffix = len(tok(self.suffix, add_special_tokens=False)["input_ids"]) if self.suffix else 0
        # Tokens the tokenizer puts before the text: the HF processors (ProcessorMixin.__call__) call it with its
        # defaults, i.e. add_special_tokens=True, so a Llama/Mistral BOS is there (Qwen adds nothing).
        plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
        at = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        self.n_prefix = at[0] if at else 0
        # Non-image tokens of one image text (Qwen: vision_start + vision_end = 2; LLaVA: 0): they separate the
        # leading image block from the instruction in the HF processor's output.
        markup = tok(self.lead_text.rstrip(), add_special_tokens=False)["input_ids"]
        self.n_markup = sum(1 for t in markup if t != self.placeholder_id)

    def check_row(self, side: Side, row: Any, rest: str) -> None:
        if self.image_text != self.placeholder and self.image_text in rest:
            raise InputError(f"row {row}: the text contains the model's own image text {self.image_text!r}")
        if side.videos:
            if self.join_as_vlm2vec:
                raise InputError(f"row {row}: video rows need model.layout: mmembed (VLM2Vec's layout is images only)")
            if self.video_text != self.video_placeholder and self.video_text in rest:
                raise InputError(f"row {row}: the text contains the model's own video text {self.video_text!r}")

    def _join(self, lead: int, chunks: Sequence[str], kinds: Sequence[str] | None = None) -> str:
        """The row's text: each leading item's text, then the chunks with each inline item's text between them."""
        if not kinds or "video" not in kinds:
            return self.lead_text * lead + self.image_text.join(chunks) + self.suffix
        items = [self.video_text if k == "video" else self.image_text for k in kinds]
        heads = [self.video_text if k == "video" else self.lead_text for k in kinds[:lead]]
        body = chunks[0] + "".join(t + c for t, c in zip(items[lead:], chunks[1:]))
        return "".join(heads) + body + self.suffix

    def text(self, side: Side, row: Any) -> str:
        """The HF processor's text for one row (untruncated): leading images, then ``instruction text``."""
        lead, _, chunks, kinds = self.media_layout(side, row)
        return self._join(lead, chunks, kinds)

    def texts(self, sides: Sequence[Side], rows: Sequence[Any]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The HF processor's texts, truncated to ``max_length`` text tokens, with each row's leading items (B,)
        and instruction token count (B,) (see :meth:`_texts`)."""
        return self._texts(sides, rows)[:3]

    def _texts(
        self, sides: Sequence[Side], rows: Sequence[Any]
    ) -> tuple[list[str], torch.Tensor, torch.Tensor, list[list[str]]]:
        """The HF processor's texts, truncated to ``max_length`` text tokens, with each row's leading items (B,),
        instruction token count (B,) and leading items' kinds (``image`` / ``video``).

        All text chunks of the batch are tokenized in one call (no special tokens, with offsets); an over-long
        row loses tokens from its end, chunk by chunk, by cutting the chunk *strings* at token boundaries (no
        decode round trip), so the image texts between chunks, and thus the HF processor's image runs, stay whole.
        """
        layouts = [self.media_layout(s, r) for s, r in zip(sides, rows)]
        strings = [c for _, _, chunks, _ in layouts for c in chunks]
        enc = self.tokenizer(strings, add_special_tokens=False, return_offsets_mapping=True)
        encoded, offsets = enc["input_ids"], enc["offset_mapping"]
        budget = max(self.max_length - self.n_prefix - self.n_suffix, 0)
        texts, leads, n_instr, lead_kinds, pos = [], [], [], [], 0
        for (lead, instr_chars, chunks, kinds), row in zip(layouts, rows):
            counts = [len(x) for x in encoded[pos : pos + len(chunks)]]
            spans = offsets[pos : pos + len(chunks)]
            pos += len(chunks)
            instr = sum(1 for start, _ in spans[0] if start < instr_chars) if instr_chars else 0
            keep = keep_counts(counts, budget)
            if keep is not None:
                self.warn_truncation(row)
                for j, k in enumerate(keep):
                    if k < counts[j]:
                        chunks[j], counts[j] = _cut(chunks[j], spans[j], k), k
            texts.append(self._join(lead, chunks, kinds))
            leads.append(lead)
            lead_kinds.append(kinds[:lead])
            n_instr.append(min(instr, counts[0]))
        return texts, torch.tensor(leads, dtype=torch.long), torch.tensor(n_instr, dtype=torch.long), lead_kinds

    def pool_mask(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        leads: torch.Tensor,
        n_instr: torch.Tensor,
        lead_markup: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) long: 1 on real tokens except the tokenizer's BOS and the instruction tokens.

        Counted over each row's non-image real tokens (rank r), the prefix is r < n_prefix and the instruction
        follows the prefix and the leading images' markup: n_prefix + lead * n_markup <= r < that + n_instr
        (``lead_markup`` (B,), when given, replaces lead * n_markup: leading videos carry their own markup, e.g.
        Qwen3-VL's per-frame timestamps). Image and video runs are skipped by the ranking, so their (per-item,
        per-model) lengths are not needed; leading visual tokens stay pooled, as in the composed processor.
        """
        real = attention_mask.bool()
        is_text = real & (input_ids != self.placeholder_id)
        if self.video_token_id is not None:
            is_text &= input_ids != self.video_token_id
        rank = is_text.long().cumsum(dim=1) - 1  # (B, L): index among the row's text tokens
        markup = leads * self.n_markup if lead_markup is None else lead_markup
        start = (self.n_prefix + markup).unsqueeze(1)  # (B, 1)
        dropped = is_text & ((rank < self.n_prefix) | ((rank >= start) & (rank < start + n_instr.unsqueeze(1))))
        return (real & ~dropped).long()

    def __call__(
        self, sides: Sequence[Side], rows: Sequence[Any] | None = None, *, video_options: Any = None
    ) -> dict[str, torch.Tensor]:
        """Collate rows into the HF processor's batch plus mmembed's keys.

        Args:
            sides, rows: the rows and how errors name them (default: their index).
            video_options: this call's :class:`~mmembed.video.VideoOptions`, or a mapping of keys overriding the
                processor's (:func:`resolve_video_options`).

        Returns:
            the HF processor's tensors (``input_ids`` (B, L), ``attention_mask`` (B, L), and with images
            ``pixel_values``: (N_patches, C*T*P*P) with ``image_grid_thw`` (N_img, 3) for Qwen2-VL,
            (N_img, 3, S, S) for LLaVA; with videos ``pixel_values_videos``: (N_video_patches, C*T*P*P) with
            ``video_grid_thw`` (N_vid, 3) for Qwen, (N_vid, T, 3, S, S) for LLaVA-OneVision), plus ``pool_mask``
            (B, L) (the attention mask with BOS and the instruction zeroed, see :meth:`pool_mask`),
            ``image_counts`` (B,) and, when a row has a video, ``video_counts`` (B,).
        """
        rows = list(rows) if rows is not None else list(range(len(sides)))
        texts, leads, n_instr, lead_kinds = self._texts(sides, rows)
        images = self.decode_images(sides, rows)
        kw: dict[str, Any] = {}
        videos = []
        if any(s.videos for s in sides):
            options = resolve_video_options(self.video_options, video_options)
            videos = self.decode_videos(sides, rows, options)
            if self.video_grid_key is None and len({len(v) for v in videos}) > 1:  # one (N_vid, T, 3, S, S) tensor
                shown = ", ".join(f"{v.source} ({len(v)} frames)" for v in videos)
                raise InputError(
                    f"the videos of one batch need the same number of frames for this model: {shown}; "
                    "set video max_frames (and no fps) so every video is sampled alike, or batch them apart"
                )
            vp = self.hf_processor.video_processor
            kw = {"videos": [v.frames for v in videos], "videos_kwargs": hf_video_kwargs(vp, videos, options)}
            if any("video" in k for k in lead_kinds):
                kw["return_text_replacement_offsets"] = True
        enc = self.hf_processor(
            text=texts,
            images=images or None,
            padding=True,
            padding_side=self.padding_side,
            return_tensors="pt",
            **kw,
        )
        out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        out["attention_mask"] = out["attention_mask"].long()
        if self.text_positions:
            mask = out["attention_mask"]
            out["position_ids"] = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 1)
        markup = self.lead_markup(lead_kinds, enc.get("text_replacement_offsets")) if videos else None
        out["pool_mask"] = self.pool_mask(out["input_ids"], out["attention_mask"], leads, n_instr, markup)
        out["image_counts"] = torch.tensor([len(s.images) for s in sides], dtype=torch.long)
        if videos:
            out["video_counts"] = torch.tensor([len(s.videos) for s in sides], dtype=torch.long)
        return out

    def lead_markup(self, lead_kinds: Sequence[Sequence[str]], offsets: Sequence[Any] | None) -> torch.Tensor:
        """(B,) long: the non-visual tokens of each row's leading items (Qwen: vision start/end per image; per
        video whatever the HF processor wrote around its frames, e.g. Qwen3-VL's ``<t seconds>`` per frame pair).

        A leading video's text is the model's video text with the matched placeholder (``offsets``: the HF
        processor's ``text_replacement_offsets``, in text order) replaced by its expansion; tokenized alone, as it
        sits between special tokens or at the start of the row.
        """
        # the visual pads (thousands per video) are special tokens: dropping them from the text leaves the markup's
        # tokenization unchanged, and the tokenizer then sees only the markup
        pads = [t for t in self.tokenizer.convert_ids_to_tokens([self.video_token_id, self.placeholder_id]) if t]
        out = []
        for b, kinds in enumerate(lead_kinds):
            n = 0
            for j, kind in enumerate(kinds):
                if kind == "image":
                    n += self.n_markup
                    continue
                entry = offsets[b][j] if offsets is not None else None
                if entry is None or entry.get("type") != "video":
                    raise InputError(f"row {b}: the HF processor did not report where its video {j} went")
                text = self.video_text.replace(entry["text"], entry["replacement"], 1)
                for pad in pads:
                    text = text.replace(pad, "")
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                n += len(ids) - ids.count(self.placeholder_id) - ids.count(self.video_token_id)
            out.append(n)
        return torch.tensor(out, dtype=torch.long)


def _cut(chunk: str, offsets: Sequence[tuple[int, int]], keep: int) -> str:
    """``chunk`` cut after its first ``keep`` tokens (character offsets from the tokenizer).

    Cut at the end of the last kept token, so no whitespace dangles (trimmed offsets would leave the space before
    the first dropped token, an extra token on re-tokenization), but never past the first dropped token's start
    (byte-level tokens sharing one character): the kept text then re-tokenizes to at most ``keep`` tokens.
    """
    if keep <= 0:
        return ""
    if keep >= len(offsets):
        return chunk
    return chunk[: min(offsets[keep - 1][1], offsets[keep][0])]


def video_args(backbone: Any) -> dict[str, Any]:
    """The :class:`NativeProcessor` video arguments a native backbone gives (none when it takes no video)."""
    text = getattr(backbone, "video_text", None)
    if text is None:
        return {}
    return {
        "video_text": text,
        "video_token_id": backbone.video_token_id,
        "video_options": backbone.video_options,
        "video_tokens": backbone.tokens_per_video(),
        "video_keys": backbone.video_keys,
        "video_grid_key": backbone.video_grid_key,
    }

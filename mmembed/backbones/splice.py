"""Splice the visual rows into a backbone's token sequence and number every position (the one splice of mmembed).

The HF processor expands each image to the number of tokens the model's own projector gives. When mmembed
replaces the projector with one of its connectors (a different count per image) or merges visual tokens before the
LLM (AIM, docs/algorithms.md §5a), each image's run of image tokens is replaced by the new tokens and every position id
is recomputed, so the LLM never sees positions that disagree with its tokens (docs/algorithms.md §8).

One function serves every backbone. When each image keeps its token count and positions are 1-D (the composed
model, whose processor expands each placeholder to the exact count, and LLaVA), the rows are written in one
``masked_scatter`` and positions are ``cumsum(attention_mask) - 1``, so left and right padding give the same
embedding. Otherwise each image run is replaced row by row.

Positions follow Qwen2-VL's M-RoPE (arXiv 2409.12191 §2.1; HF ``Qwen2VLModel.get_rope_index``): a text token takes
(p, p, p) with p the previous maximum + 1, an image's tokens take ``offset + (t, h, w)`` on their grid, and the next
text token takes ``offset + span`` (span = the largest grid extent). For 1-D RoPE models (LLaVA) the three rows are
equal and tokens are numbered in order. Merged survivors keep the (t, h, w) of their original grid cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmembed.types import InputError
from mmembed.visual import VisualItem, line_positions

__all__ = ["Spliced", "image_runs", "splice_visual"]


@dataclass
class Spliced:
    """The rebuilt batch: ``embeds`` (B, L', d), ``attention_mask`` / ``pool_mask`` (B, L') long,
    ``position_ids`` (3, B, L') long (padding gets 1, as HF), ``visual`` (B, L') bool, and ``source`` (B, L'):
    the column of the unmodified batch each token comes from (-1 for padding; for the tokens of an image whose
    count differs from its run, as after a connector swap, the run's first column)."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    pool_mask: torch.Tensor
    position_ids: torch.Tensor
    visual: torch.Tensor
    source: torch.Tensor


def image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int, int]]:
    """Contiguous runs of the image token, in batch order: ``(row, start, stop)``; one run per image."""
    is_img = (input_ids == image_token_id).to(torch.int8)
    pad = is_img.new_zeros(is_img.shape[0], 1)
    edges = torch.diff(is_img, dim=1, prepend=pad, append=pad)  # (B, L+1): +1 at starts, -1 at stops
    starts, stops = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()
    return [(b, s, e) for (b, s), (_, e) in zip(starts, stops)]  # nonzero is row-major: runs pair up in order


def splice_visual(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pool_mask: torch.Tensor,
    items: list[VisualItem] | None,
    image_token_id: int,
    mrope: bool = False,
) -> Spliced:
    """Write each image's :class:`VisualItem` at its image-token positions and number every position.

    Args:
        embeds: (B, L, d) token embeddings of ``input_ids`` (B, L).
        attention_mask, pool_mask: (B, L).
        items: one per image, in batch order (``None``: a text-only batch).
        image_token_id: the placeholder id the processor wrote for each visual token.
        mrope: the backbone reads (3, B, L) M-RoPE positions (Qwen2-VL); else (B, L) positions suffice.

    The padding side is kept (left when every row's last column is real). The general path loops over rows and
    images, never over tokens.
    """
    items = items or []
    slots = input_ids == image_token_id  # (B, L)
    if not mrope and int(slots.sum()) == sum(int(it.tokens.shape[0]) for it in items):
        return _splice_in_place(embeds, slots, attention_mask, pool_mask, items)
    runs = image_runs(input_ids, image_token_id)
    if len(runs) != len(items):
        per_row = slots.sum(dim=1).tolist()
        raise InputError(
            f"{len(runs)} image token runs ({sum(per_row)} image tokens, per row {per_row}) in the batch but "
            f"{len(items)} images with {sum(int(it.tokens.shape[0]) for it in items)} visual tokens"
        )
    device = embeds.device
    bsz = embeds.shape[0]
    by_row: list[list[tuple[int, int, VisualItem]]] = [[] for _ in range(bsz)]
    for (b, s, e), item in zip(runs, items):
        by_row[b].append((s, e, item))
    rows = [_row(b, embeds, attention_mask, pool_mask, by_row[b]) for b in range(bsz)]
    new_len = max((r[0].shape[0] for r in rows if r is not None), default=0)
    left = bool(attention_mask[:, -1].all())
    out = embeds.new_zeros(bsz, new_len, embeds.shape[-1])
    mask = attention_mask.new_zeros(bsz, new_len)
    pool = pool_mask.new_zeros(bsz, new_len)
    pos = torch.ones(3, bsz, new_len, dtype=torch.long, device=device)
    visual = torch.zeros(bsz, new_len, dtype=torch.bool, device=device)
    source = torch.full((bsz, new_len), -1, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        if row is None:
            continue
        e, p, src, pl, vis = row
        n = e.shape[0]
        sl = slice(new_len - n, new_len) if left else slice(0, n)
        out[b, sl], mask[b, sl], pool[b, sl], pos[:, b, sl], visual[b, sl], source[b, sl] = e, 1, pl, p, vis, src
    return Spliced(out, mask, pool, pos, visual, source)


def _splice_in_place(
    embeds: torch.Tensor,
    slots: torch.Tensor,
    attention_mask: torch.Tensor,
    pool_mask: torch.Tensor,
    items: list[VisualItem],
) -> Spliced:
    """Every image keeps its count (``slots`` (B, L) marks one column per visual token): one ``masked_scatter``
    (LLaVA's ``tokenizer_image_token`` splice), 1-D positions ``cumsum(mask) - 1`` (docs/algorithms.md §8), the
    sequence length unchanged."""
    if items:
        feats = torch.cat([it.tokens for it in items]).to(embeds.dtype)
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats)
    pos = (attention_mask.cumsum(dim=-1) - 1).clamp_min(0)  # after splicing: pad-side independent
    source = torch.arange(slots.shape[1], device=slots.device).expand_as(slots)
    source = torch.where(attention_mask.bool(), source, torch.full_like(source, -1))
    return Spliced(embeds, attention_mask, pool_mask, pos.expand(3, *pos.shape), slots, source)


def _row(
    b: int,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    pool_mask: torch.Tensor,
    runs: list[tuple[int, int, VisualItem]],
) -> tuple[torch.Tensor, ...] | None:
    """Row b rebuilt: (embeds (n, d), positions (3, n), source (n,), pool (n,), visual (n,)), or ``None`` if empty."""
    valid = attention_mask[b].nonzero().flatten()
    if len(valid) == 0:
        return None
    device = embeds.device
    first, end = int(valid[0]), int(valid[-1]) + 1
    emb, pos, src, pool, vis = [], [], [], [], []
    cur, col = 0, first
    for s, e, item in [*runs, (end, end, None)]:
        if s > col:  # text columns before this image (or up to the end)
            n = s - col
            emb.append(embeds[b, col:s])
            pos.append(line_positions(n, device) + cur)
            src.append(torch.arange(col, s, device=device))
            pool.append(pool_mask[b, col:s])
            vis.append(torch.zeros(n, dtype=torch.bool, device=device))
            cur += n
        if item is None:
            break
        n = item.tokens.shape[0]
        emb.append(item.tokens.to(embeds.dtype))
        pos.append(item.pos.to(device) + cur)
        if item.origin == e - s:  # the run still has one column per original token
            index = torch.arange(n, device=device) if item.index is None else item.index.to(device)
            src.append(index + s)
        else:
            src.append(torch.full((n,), s, device=device))
        pool.append(pool_mask[b, s].expand(n))
        vis.append(torch.ones(n, dtype=torch.bool, device=device))
        cur, col = cur + int(item.span), e
    return torch.cat(emb), torch.cat(pos, dim=1), torch.cat(src), torch.cat(pool), torch.cat(vis)

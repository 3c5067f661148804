"""Rebuild a native VLM's input sequence when its visual tokens change (connector swap, merging, pruning).

The HF processor expands each image to the number of tokens the model's own projector gives. When mmembed
replaces the projector with one of its connectors (a different count per image) or merges visual tokens before the
LLM (AIM, ALGORITHMS.md §5a), each image's run of image tokens is replaced by the new tokens and every position id
is recomputed, so the LLM never sees positions that disagree with its tokens (ALGORITHMS.md §8).

Positions follow Qwen2-VL's M-RoPE (arXiv 2409.12191 §2.1; HF ``Qwen2VLModel.get_rope_index``): a text token takes
(p, p, p) with p the previous maximum + 1, an image's tokens take ``offset + (t, h, w)`` on their grid, and the next
text token takes ``offset + span`` (span = the largest grid extent). For 1-D RoPE models (LLaVA) the three rows are
equal and tokens are numbered in order. Merged survivors keep the (t, h, w) of their original grid cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VisualItem", "Spliced", "image_runs", "grid_positions", "line_positions", "splice_visual"]


@dataclass
class VisualItem:
    """One image's tokens for the LLM.

    Attributes:
        tokens: (N, d) embeddings at the LLM width.
        pos: (3, N) long (t, h, w) positions relative to the image's first position.
        span: positions the image occupies; the next text token sits at ``offset + span``.
        index: (N,) long, each token's index among the image's tokens before merging (``None``: all, in order).
        origin: token count before merging.
    """

    tokens: torch.Tensor
    pos: torch.Tensor
    span: int
    index: torch.Tensor | None = None
    origin: int = -1

    def __post_init__(self) -> None:
        if self.origin < 0:
            self.origin = self.tokens.shape[0]

    def select(self, idx: torch.Tensor, tokens: torch.Tensor) -> VisualItem:
        """Survivors ``idx`` (N',) of a merge with their merged ``tokens`` (N', d); positions and span kept."""
        idx = idx.to(self.pos.device)
        index = idx if self.index is None else self.index[idx]
        return VisualItem(tokens, self.pos[:, idx], self.span, index, self.origin)


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


def grid_positions(t: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(3, t*h*w) positions (t, h, w) of a grid in raster order."""
    ti = torch.arange(t, device=device).view(-1, 1, 1).expand(t, h, w)
    hi = torch.arange(h, device=device).view(1, -1, 1).expand(t, h, w)
    wi = torch.arange(w, device=device).view(1, 1, -1).expand(t, h, w)
    return torch.stack([ti.flatten(), hi.flatten(), wi.flatten()])


def line_positions(n: int, device: torch.device | None = None) -> torch.Tensor:
    """(3, n) positions of n tokens in a line (1-D RoPE, or visual tokens without a grid)."""
    return torch.arange(n, device=device).expand(3, n)


def splice_visual(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pool_mask: torch.Tensor,
    items: list[VisualItem],
    image_token_id: int,
) -> Spliced:
    """Replace each image-token run of the batch by its :class:`VisualItem` and recompute all positions.

    Args:
        embeds: (B, L, d) token embeddings of ``input_ids`` (B, L).
        attention_mask, pool_mask: (B, L).
        items: one per image run, in batch order.

    The padding side is kept (left when every row's last column is real). Rows are handled one at a time (a loop
    over rows and images, never over tokens).
    """
    runs = image_runs(input_ids, image_token_id)
    if len(runs) != len(items):
        raise ValueError(f"{len(runs)} image token runs in the batch but {len(items)} images")
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

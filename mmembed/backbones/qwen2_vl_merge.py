"""Token merging between Qwen2-VL's vision tower and its LLM, with M-RoPE positions computed by mmembed.

Qwen2-VL places each visual token at a 3-D rotary position (t, h, w) offset by the text before it, and text
tokens at (p, p, p) (Qwen2-VL paper arXiv 2409.12191 §2.1; HF ``Qwen2VLModel.get_rope_index``). After a
pre-LLM reducer merges an image's tokens (:class:`~mmembed.tokens.merge.MergeReducer`, survivors in raster
order with their original indices), the grid no longer matches the token count, so HF cannot derive the positions
(ALGORITHMS.md §8): :func:`mrope_position_ids` computes them for the full sequence and :func:`merge_visual_tokens`
keeps the survivors' original (t, h, w) ids, so positions always agree with the tokens the LLM sees.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["mrope_position_ids", "image_runs", "merge_visual_tokens"]


def image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int, int]]:
    """Contiguous runs of the image token, in batch order: ``(row, start, stop)``; one run per image."""
    runs = []
    is_img = (input_ids == image_token_id).to(torch.int8)
    for b in range(input_ids.shape[0]):
        edges = torch.diff(is_img[b], prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
        starts, stops = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        runs += [(b, int(s), int(e)) for s, e in zip(starts, stops)]
    return runs


def mrope_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    merge_size: int,
) -> torch.Tensor:
    """M-RoPE position ids (3, B, L) of an unmerged Qwen2-VL batch (images only; padding gets 1, as HF).

    Text token: (p, p, p), p = previous max + 1. Image k with grid (t, h, w) patches: its (h/m)(w/m) tokens per
    frame in raster order get ``offset + (ti, hi, wi)``, offset = the position the next text token would take.
    """
    bsz, length = input_ids.shape
    pos = torch.ones(3, bsz, length, dtype=torch.long, device=input_ids.device)
    runs = image_runs(input_ids, image_token_id)
    by_row: dict[int, list[tuple[int, int]]] = {}
    for b, s, e in runs:
        by_row.setdefault(b, []).append((s, e))
    k = 0
    for b in range(bsz):
        valid = attention_mask[b].nonzero().flatten()
        if len(valid) == 0:
            continue
        cur, i, end = 0, int(valid[0]), int(valid[-1]) + 1
        row_runs = dict(by_row.get(b, []))
        while i < end:
            if i in row_runs:
                assert image_grid_thw is not None
                t, h, w = (int(x) for x in image_grid_thw[k])
                h, w = h // merge_size, w // merge_size
                stop = row_runs[i]
                if stop - i != t * h * w:
                    raise ValueError(f"row {b}: image run of {stop - i} tokens but grid {t}x{h}x{w}")
                ti = torch.arange(t).view(-1, 1).expand(-1, h * w).flatten()
                hi = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
                wi = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
                grid = torch.stack([ti, hi, wi]).to(pos.device) + cur
                pos[:, b, i:stop] = grid
                cur, i, k = int(grid.max()) + 1, stop, k + 1
            else:
                pos[:, b, i] = cur
                cur, i = cur + 1, i + 1
    return pos


def merge_visual_tokens(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_feats: tuple[torch.Tensor, ...],
    image_grid_thw: torch.Tensor,
    image_token_id: int,
    merge_size: int,
    reducer: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each image's visual tokens and drop the merged-away rows.

    Args:
        embeds: (B, L, d) token embeddings (image rows are overwritten).
        image_feats: per image (N_k, d) merger outputs, in batch order.
        reducer: has ``reduce((1, N, d)) -> ((1, N', d), (1, N') original indices, ascending)``.

    Returns:
        ``inputs_embeds`` (B, L', d), ``attention_mask`` (B, L'), ``position_ids`` (3, B, L') and ``source``
        (B, L'): each kept token's column in the unmerged batch (-1 for padding). The padding side is kept.
    """
    pos = mrope_position_ids(input_ids, attention_mask, image_grid_thw, image_token_id, merge_size)
    keep = attention_mask.bool().clone()
    embeds = embeds.clone()
    runs = image_runs(input_ids, image_token_id)
    if len(runs) != len(image_feats):
        raise ValueError(f"{len(runs)} image token runs but {len(image_feats)} images")
    for (b, s, e), feats in zip(runs, image_feats):
        merged, idx = reducer.reduce(feats[None].to(embeds.dtype))  # (1, N', d), (1, N')
        cols = torch.arange(s, e, device=embeds.device)[idx[0].to(embeds.device)]
        keep[b, s:e] = False
        keep[b, cols] = True
        embeds[b, cols] = merged[0].to(embeds.dtype)
    left = bool(attention_mask[:, -1].all())
    lengths = keep.sum(dim=1)
    new_len = int(lengths.max())
    bsz, d = embeds.shape[0], embeds.shape[-1]
    out = embeds.new_zeros(bsz, new_len, d)
    mask = attention_mask.new_zeros(bsz, new_len)
    new_pos = pos.new_ones(3, bsz, new_len)
    source = torch.full((bsz, new_len), -1, dtype=torch.long, device=embeds.device)
    for b in range(bsz):
        cols = keep[b].nonzero().flatten()
        n = len(cols)
        start = new_len - n if left else 0
        out[b, start : start + n] = embeds[b, cols]
        mask[b, start : start + n] = 1
        new_pos[:, b, start : start + n] = pos[:, b, cols]
        source[b, start : start + n] = cols
    return out, mask, new_pos, source

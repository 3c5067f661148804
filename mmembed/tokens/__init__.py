"""Token reduction before and inside the LLM (ALGORITHMS.md §5): ``merge``, ``prune`` and ``aim`` (both).

A reducer says where it acts with ``pre_llm`` (``forward(tokens (N_img, N, d)) -> (N_img, num_tokens(N), d)``,
applied per image after the connector) and ``in_llm`` (a per-layer keep schedule run by the backbone's
layer loop, :func:`mmembed.tokens.prune.pruned_forward`).
"""

from __future__ import annotations

from mmembed.tokens import aim, merge, prune  # noqa: F401  (registration)

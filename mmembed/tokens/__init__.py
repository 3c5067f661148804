"""Token reduction (docs/algorithms.md §5), two contracts: a :class:`Merger` acts before the LLM (fewer visual
tokens per image, ``model.merge``), a :class:`Pruner` inside it (a per-layer keep schedule run by
:func:`pruned_forward`, ``model.prune``). AIM is both: ``merge: {type: aim}`` + ``prune: {type: aim}``.
"""

from __future__ import annotations

from mmembed.tokens.merge import AIMMerger, Merger
from mmembed.tokens.prune import AIMPruner, Pruner, pruned_forward

__all__ = ["Merger", "Pruner", "AIMMerger", "AIMPruner", "pruned_forward"]

"""Training: the contrastive training loop, DeepSpeed glue and GradCache (imports DeepSpeed lazily)."""

from __future__ import annotations

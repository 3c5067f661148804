"""Evaluation: the MMEB protocol (each query ranked against its own candidates) and retrieval metrics.

- :func:`evaluate` scores a model on ``{dataset: [EvalExample]}`` (hit@1, meta-task / IND / OOD /
  overall means, hit@k, recall@k, MRR, NDCG@k; tie-aware; sharded over ranks; optional disk cache);
- :func:`run_eval` is ``mmembed eval``: load, read, evaluate, write ``scores.json``/``.md``/``examples.html``;
- :func:`eval_in_training` is the hook the training loop calls every ``train.eval_every`` steps;
- :class:`OpenClipEncoder` / :func:`load_openclip` put open_clip baselines behind the same interface.
"""

from __future__ import annotations

from mmembed.eval.embed import EmbeddingCache, dir_fingerprint, model_fingerprint
from mmembed.eval.metrics import hit_at_k, mrr, ndcg_at_k, ranking_metrics, recall_at_k
from mmembed.eval.openclip import OpenClipEncoder, load_openclip
from mmembed.eval.protocol import aggregate, evaluate, hit_at_1, select_metric
from mmembed.eval.run import eval_in_training, load_eval_model, load_eval_sets, run_eval
from mmembed.eval.tasks import MMEB_V1, read_task_meta, task_info

__all__ = [
    "evaluate",
    "hit_at_1",
    "hit_at_k",
    "recall_at_k",
    "mrr",
    "ndcg_at_k",
    "ranking_metrics",
    "aggregate",
    "select_metric",
    "run_eval",
    "eval_in_training",
    "load_eval_model",
    "load_eval_sets",
    "EmbeddingCache",
    "dir_fingerprint",
    "model_fingerprint",
    "OpenClipEncoder",
    "load_openclip",
    "MMEB_V1",
    "task_info",
    "read_task_meta",
]

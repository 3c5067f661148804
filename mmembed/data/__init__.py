"""Data: MMEB/pairs readers, manifests and instructions, mixing, webdataset streaming, collation.

Nothing here imports the model: the collator is handed the model's processor (``placeholder``,
``__call__(sides)``, ``length(side)``). Entry points:

- ``build_train_loader(cfg.data, processor, global_batch_size=, max_steps=, seed=, rank=, world_size=)``
  -> an iterable of batches ``{"query", "target", "num_negatives", "negative_mask", "target_keys",
  "datasets", "step", "skips"}`` with ``state_dict()``/``load_state_dict()`` (the data position) and
  ``skips`` (a :class:`SkipCounter`, cumulative);
- ``build_eval_sets(cfg.data, placeholder)`` / ``read_eval_set(path)`` -> ``{name: [EvalExample]}``;
- ``python -m mmembed.data.synthetic --out DIR``: the demo set; ``tools/convert_to_wds.py``: shards.

See docs/data.md for the formats, the manifest and the bad-sample rules.
"""

from __future__ import annotations

from mmembed.data.build import build_eval_sets, build_train_batches, build_train_loader, is_shard_spec
from mmembed.data.collate import Collator, group_by_length, sample_length, select_negatives
from mmembed.data.dataset import SampleDataset, decode_sample, decode_side, iter_samples, read_eval_set
from mmembed.data.formats import MMEB_PLACEHOLDER, EvalExample, ParseOptions, detect_format
from mmembed.data.instructions import Instructions
from mmembed.data.manifest import DatasetSpec, load_manifest, resolve_datasets
from mmembed.data.mixing import MixtureSampler, StepLoader, TrainBatches
from mmembed.data.sample import Sample, Side
from mmembed.data.skips import BadSample, DataError, SkipCounter
from mmembed.data.wds import WdsLoader, WdsStream, list_shards

__all__ = [
    "BadSample",
    "Collator",
    "DataError",
    "DatasetSpec",
    "EvalExample",
    "Instructions",
    "MMEB_PLACEHOLDER",
    "MixtureSampler",
    "ParseOptions",
    "Sample",
    "SampleDataset",
    "Side",
    "SkipCounter",
    "StepLoader",
    "TrainBatches",
    "WdsLoader",
    "WdsStream",
    "build_eval_sets",
    "build_train_batches",
    "build_train_loader",
    "decode_sample",
    "decode_side",
    "detect_format",
    "group_by_length",
    "is_shard_spec",
    "iter_samples",
    "list_shards",
    "load_manifest",
    "read_eval_set",
    "resolve_datasets",
    "sample_length",
    "select_negatives",
]

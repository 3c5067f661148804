"""From ``DataCfg`` to the objects the training loop and the evaluator use.

Training::

    loader = build_train_loader(cfg.data, processor, global_batch_size=G, seed=seed,
                                rank=r, world_size=W, max_steps=N)
    loader.load_state_dict(ckpt["data"])        # on resume (before iterating)
    for batch in loader:                        # batch["query"], batch["target"], batch["num_negatives"], ...
        ...
        ckpt["data"] = loader.state_dict()      # the position: nothing replayed or skipped on resume
    loader.skips                                # SkipCounter merged from the workers (cumulative)

``data.train`` / ``data.eval`` may be an MMEB download as it is (a folder of subset folders, one dataset per
subset, images found beside it: :mod:`mmembed.data.manifest`, docs/mmeb_parsing.md §4).
``data.train`` pointing at tar shards (a directory with ``*.tar`` / ``shards.json``) gives a
:class:`WdsLoader`; anything else (manifest, directory or file of parquet/JSONL) a map-style
:class:`StepLoader` whose global batch at each step is independent of the number of ranks.
``data.shuffle_buffer: 0`` turns all shuffling off in both, so a source and its conversion yield the
same order (one rank).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmembed.config import ConfigError
from mmembed.data.collate import Collator, sample_length
from mmembed.data.dataset import SampleDataset, read_eval_set
from mmembed.data.formats import EvalExample
from mmembed.data.manifest import resolve_datasets
from mmembed.data.mixing import MixtureSampler, StepLoader, TrainBatches
from mmembed.data.skips import SkipCounter
from mmembed.data.wds import INDEX_NAME, WdsLoader, WdsStream, list_shards

__all__ = ["build_train_loader", "build_train_batches", "build_eval_sets", "is_shard_spec"]

log = logging.getLogger(__name__)


def is_shard_spec(spec: str | Path) -> bool:
    """True when ``spec`` names webdataset shards rather than parquet/JSONL data."""
    p = Path(spec)
    if p.is_dir():
        return (p / INDEX_NAME).is_file() or any(p.glob("*.tar"))
    return p.suffix == ".tar" or p.name == INDEX_NAME


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def build_train_batches(
    cfg: Any, processor: Any, *, global_batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
) -> TrainBatches:
    """The map-style per-step batches for ``data.train`` (a manifest, directory or file)."""
    specs = resolve_datasets(_get(cfg, "train"), _get(cfg, "image_root"))
    _warn_ood(specs)
    placeholder = getattr(processor, "placeholder", "<image>")
    max_pixels = _get(cfg, "max_pixels", 89_478_485)
    datasets = [SampleDataset(s, placeholder=placeholder, max_pixels=max_pixels, seed=seed) for s in specs]
    weights = None
    if any(s.weight is not None for s in specs):
        weights = [s.weight if s.weight is not None else float(len(d)) for s, d in zip(specs, datasets)]
    sampler = MixtureSampler(
        [len(d) for d in datasets],
        weights,
        global_batch_size=global_batch_size,
        seed=seed,
        homogeneous=bool(_get(cfg, "homogeneous", False)),
        shuffle=_get(cfg, "shuffle_buffer", 1000) != 0,
    )
    length = sample_length(processor) if _get(cfg, "group_by_length", False) and hasattr(processor, "length") else None
    return TrainBatches(
        datasets,
        sampler,
        rank=rank,
        world_size=world_size,
        collate=Collator(processor, _get(cfg, "num_negatives", 0)),
        length=length,
        strict=bool(_get(cfg, "strict", False)),
    )


def _warn_ood(specs: list[Any]) -> list[str]:
    """Warn (and return the names) when training reads MMEB-V1 out-of-distribution eval sets.

    The ``TIGER-Lab/MMEB-train`` download also holds subsets such as ImageNet-A, ImageNet-R and FashionIQ, which
    MMEB scores as OOD; VLM2Vec trains on the 20 IND subsets it names (``--subset_name``), so a whole folder read as
    it is would leak them into training.
    """
    from mmembed.eval.tasks import task_info  # lazy: mmembed.eval imports this package

    ood = [s.name for s in specs if task_info(s.name)["split"] == "OOD"]
    if ood:
        log.warning(
            "training on %s, scored as out-of-distribution by MMEB-V1; list the training subsets in a manifest "
            "('subsets: [...]', docs/mmeb_parsing.md §4) to keep them out",
            ", ".join(ood),
        )
    return ood


def build_train_loader(
    cfg: Any,
    processor: Any,
    *,
    global_batch_size: int,
    max_steps: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    **loader_kw: Any,
) -> StepLoader | WdsLoader:
    """The training loader for this rank (see the module docstring). ``cfg`` is a DataCfg or dict."""
    train = _get(cfg, "train")
    if not train:
        raise ValueError("data.train is not set (a manifest YAML, a directory of parquet/JSONL files, or shards)")
    if global_batch_size % world_size:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by world size {world_size}")
    workers = int(_get(cfg, "num_workers", 0))
    if is_shard_spec(train):
        if _get(cfg, "homogeneous", False):
            # a shard stream interleaves its datasets sample by sample; one dataset per batch needs the manifest
            raise ConfigError(
                "data.homogeneous",
                "one dataset per batch needs a manifest (data.train: a YAML of datasets), not webdataset shards",
            )
        shards, counts = list_shards(train)
        buf = int(_get(cfg, "shuffle_buffer", 1000))
        stream = WdsStream(
            shards,
            batch_size=global_batch_size // world_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle_buffer=buf,
            shardshuffle=buf > 0,
            resample=True,
            collate=Collator(processor, _get(cfg, "num_negatives", 0)),
            placeholder=getattr(processor, "placeholder", "<image>"),
            max_pixels=_get(cfg, "max_pixels", 89_478_485),
            strict=bool(_get(cfg, "strict", False)),
            shard_counts=counts,
        )
        if start_step:
            raise ValueError("a webdataset stream resumes from loader.load_state_dict(...), not from start_step")
        return WdsLoader(stream, num_workers=workers, max_steps=max_steps, **loader_kw)
    batches = build_train_batches(
        cfg, processor, global_batch_size=global_batch_size, seed=seed, rank=rank, world_size=world_size
    )
    return StepLoader(batches, max_steps=max_steps, start_step=start_step, num_workers=workers, **loader_kw)


def build_eval_sets(
    cfg: Any, placeholder: str = "<image>", counter: SkipCounter | None = None
) -> dict[str, list[EvalExample]]:
    """``data.eval`` -> ``{dataset: [EvalExample]}`` (positive at candidate index 0)."""
    spec = _get(cfg, "eval")
    if not spec:
        raise ValueError("data.eval is not set (a manifest YAML, a directory of MMEB-eval files, or one file)")
    return read_eval_set(spec, placeholder=placeholder, image_root=_get(cfg, "image_root"), counter=counter)

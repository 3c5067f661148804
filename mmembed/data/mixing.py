"""Weighted multi-dataset mixing with a step-addressed, rank-independent global batch.

Contract (training issue): the global batch at step ``s`` is the same set of samples whatever the
number of ranks; it depends only on the seed, the global batch size and the data. So
:class:`MixtureSampler` maps ``step -> [(dataset, row), ...]`` of length ``global_batch_size``, and
rank ``r`` of ``world`` takes the contiguous slice ``[r * B, (r + 1) * B)`` with
``B = global_batch_size // world``. Resuming at step ``s`` replays nothing and skips nothing.

Sampling: each position picks a dataset with probability ``weight / sum(weights)`` (``homogeneous``:
one dataset per global batch, so in-batch negatives come from the same task, docs/mmeb.md §1.9), then
takes that dataset's next row from a per-epoch permutation (every row once per epoch per dataset).
With ``shuffle=False`` the datasets are read in order, concatenated (the order a webdataset
conversion without shuffling yields).

A bad row (unreadable, missing image, ...) is replaced by the next row of the same dataset and
counted, so batches keep their size and stay deterministic. :class:`TrainBatches` builds, collates
and counts one rank's batch per step inside DataLoader workers; :class:`StepLoader` drives it and
exposes the position for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mmembed.data.collate import collate_problem, group_by_length
from mmembed.data.dataset import SampleDataset
from mmembed.data.sample import Sample
from mmembed.data.skips import BadSample, DataError, SkipCounter, error_marker, raise_marker

__all__ = ["MixtureSampler", "TrainBatches", "StepLoader"]


class MixtureSampler:
    """``global_batch(step) -> [(dataset index, row index), ...]`` (length ``global_batch_size``).

    Args:
        sizes: rows per dataset (after caps).
        weights: sampling weights (None: proportional to ``sizes``).
        global_batch_size: samples per optimizer step over all ranks.
        seed: with the step, the only source of randomness.
        homogeneous: every global batch comes from one dataset.
        shuffle: False reads the concatenated datasets in order (weights ignored).
    """

    def __init__(
        self,
        sizes: list[int],
        weights: list[float] | None = None,
        global_batch_size: int = 1,
        seed: int = 0,
        homogeneous: bool = False,
        shuffle: bool = True,
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every dataset needs at least one row, got sizes {sizes}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        w = np.asarray(sizes if weights is None else weights, dtype=np.float64)
        if w.shape != (len(sizes),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(sizes)} numbers >= 0 with a positive sum, got {weights}")
        self.sizes, self.probs = list(sizes), w / w.sum()
        self.global_batch_size, self.seed = global_batch_size, seed
        self.homogeneous, self.shuffle = homogeneous, shuffle
        self._step = 0  # counts[d] = rows of dataset d used before self._step
        self._counts = np.zeros(len(sizes), dtype=np.int64)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _choices(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, 0x6D6978])
        n = len(self.sizes)
        if self.homogeneous:
            return np.full(self.global_batch_size, rng.choice(n, p=self.probs), dtype=np.int64)
        return rng.choice(n, size=self.global_batch_size, p=self.probs)

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(d)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, d, epoch, 0x7065726D])
            cached = (epoch, rng.permutation(self.sizes[d]))
            self._perms[d] = cached
        return cached[1]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """The ``(dataset, row)`` pairs of the global batch at ``step`` (any order of calls)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = self.global_batch_size
        if not self.shuffle:
            total = sum(self.sizes)
            starts = np.cumsum([0, *self.sizes])
            out = []
            for p in range(step * g, step * g + g):
                q = p % total
                d = int(np.searchsorted(starts, q, side="right") - 1)
                out.append((d, int(q - starts[d])))
            return out
        if step < self._step:  # going back: replay from the start (cheap: one rng draw per step)
            self._step, self._counts = 0, np.zeros_like(self._counts)
        while self._step < step:
            self._counts += np.bincount(self._choices(self._step), minlength=len(self.sizes))
            self._step += 1
        choices = self._choices(step)
        seen = self._counts.copy()
        out = []
        for d in choices.tolist():
            k = int(seen[d])
            seen[d] += 1
            size = self.sizes[d]
            out.append((d, int(self._perm(d, k // size)[k % size])))
        return out

    def local_slice(self, rank: int, world_size: int) -> slice:
        """This rank's contiguous slice of the global batch."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        if self.global_batch_size % world_size:
            raise ValueError(f"global batch size {self.global_batch_size} is not divisible by world size {world_size}")
        b = self.global_batch_size // world_size
        return slice(rank * b, (rank + 1) * b)


class TrainBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is this rank's collated batch for that step.

    ``batches[step]`` -> the collator's dict plus ``"step"`` and ``"skips"`` (a
    :meth:`SkipCounter.to_dict`, merged by :class:`StepLoader` in the training process). Without a
    collator the dict holds ``"samples"`` (decoded :class:`Sample` objects). In a DataLoader worker a
    :class:`DataError` comes back as ``{"step", "data_error"}`` (:func:`mmembed.data.skips.error_marker`),
    re-raised by :class:`StepLoader`; called directly (no worker) it raises.

    Args:
        datasets: one :class:`SampleDataset` per mixture entry (same order as the sampler sizes).
        sampler: the global-batch sampler.
        rank, world_size: this process's slice of each global batch.
        collate: e.g. :class:`mmembed.data.collate.Collator`; runs in the DataLoader worker.
        length: optional ``Sample -> int``; when given, each global batch is ordered by length
            before slicing (same set, less padding per rank).
        strict: raise :class:`DataError` on the first bad sample.
        decode: decode images (False: Samples keep their paths; for tools that only read text).
        max_replacements: give up after this many consecutive bad rows in one dataset.
    """

    def __init__(
        self,
        datasets: list[SampleDataset],
        sampler: MixtureSampler,
        *,
        rank: int = 0,
        world_size: int = 1,
        collate: Callable[[list[Sample]], dict[str, Any]] | None = None,
        length: Callable[[Sample], int] | None = None,
        strict: bool = False,
        decode: bool = True,
        max_replacements: int = 64,
    ) -> None:
        if [len(d) for d in datasets] != sampler.sizes:
            raise ValueError("the sampler sizes do not match the datasets")
        self.datasets, self.sampler = datasets, sampler
        self.rank, self.world_size = rank, world_size
        self.slice = sampler.local_slice(rank, world_size)
        self.collate, self.length, self.strict, self.decode = collate, length, strict, decode
        self.max_replacements = max_replacements

    def __len__(self) -> int:  # steps are unbounded; the DataLoader's sampler says which to fetch
        return 2**62

    def local_indices(self, step: int) -> list[tuple[int, int]]:
        pairs = self.sampler.global_batch(step)
        if self.length is not None:

            def est(pair: tuple[int, int]) -> int:
                try:
                    return self.length(self.datasets[pair[0]].parse(pair[1]))
                except BadSample:
                    return 0

            order = group_by_length(pairs, est, window=len(pairs))
            pairs = [pairs[j] for j in order]
        return pairs[self.slice]

    def fetch(self, d: int, i: int, counter: SkipCounter) -> Sample:
        """Row ``i`` of dataset ``d``, or the next good row after it (each bad one counted)."""
        ds = self.datasets[d]
        for r in range(min(self.max_replacements, len(ds))):
            s = ds.get((i + r) % len(ds), counter, decode=self.decode)
            if s is not None:
                return s
        raise DataError(ds.where(i), "too_many_bad", f"{self.max_replacements} consecutive bad rows in '{ds.name}'")

    def samples(self, step: int) -> tuple[list[Sample], SkipCounter]:
        counter = SkipCounter(strict=self.strict)
        return [self.fetch(d, i, counter) for d, i in self.local_indices(step)], counter

    def _collate(self, step: int, samples: list[Sample], counter: SkipCounter) -> dict[str, Any]:
        """Collate; a sample the processor rejects is counted and replaced by the next row that works."""
        assert self.collate is not None
        try:
            return self.collate(samples)
        except DataError:
            raise
        except Exception:
            pass  # find the culprits one by one below
        for j, (d, i) in enumerate(self.local_indices(step)):
            s, r = samples[j], 0
            while (problem := collate_problem(self.collate, s)) is not None:
                counter.reclassify(s.source, "processor_error", problem)
                r += 1
                if r > self.max_replacements:
                    raise DataError(s.source, "too_many_bad", f"{r} consecutive rows rejected by the processor")
                s = self.fetch(d, (i + r) % len(self.datasets[d]), counter)
            samples[j] = s
        return self.collate(samples)

    def __getitem__(self, step: int) -> dict[str, Any]:
        try:
            samples, counter = self.samples(int(step))
            batch = self._collate(int(step), samples, counter) if self.collate is not None else {"samples": samples}
        except DataError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            # In a DataLoader worker torch re-raises as ``DataError(traceback text)``, which DataError's
            # 3-argument __init__ refuses, so the main process would get a RuntimeError. A marker item crosses
            # the process boundary instead; StepLoader raises the real DataError from it.
            return {"step": int(step), "data_error": error_marker(e)}
        batch["step"] = int(step)
        batch["skips"] = counter.to_dict()
        return batch


def _identity(x: Any) -> Any:
    return x


class StepLoader:
    """Iterates ``TrainBatches`` from ``start_step`` to ``max_steps`` through a DataLoader.

    Decoding, transforms and collation run in the ``num_workers`` worker processes; the batches come
    back in step order. Position = the next step to fetch; :meth:`state_dict` / :meth:`load_state_dict`
    carry it (with the seed and global batch size, checked on load) into checkpoints.
    ``skips`` accumulates the workers' skip counters.
    """

    def __init__(
        self, batches: TrainBatches, max_steps: int, start_step: int = 0, num_workers: int = 0, **loader_kw: Any
    ) -> None:
        self.batches, self.max_steps, self.step = batches, max_steps, start_step
        self.num_workers, self.loader_kw = num_workers, loader_kw
        self.skips = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            self.batches,
            batch_size=None,
            sampler=range(self.step, self.max_steps),
            num_workers=self.num_workers,
            collate_fn=_identity,
            **self.loader_kw,
        )
        for batch in loader:
            raise_marker(batch)  # a DataError in a worker (strict mode, too many bad rows)
            self.skips.merge(batch["skips"])
            self.step = batch["step"] + 1
            yield batch

    def __len__(self) -> int:
        return max(0, self.max_steps - self.step)

    def state_dict(self) -> dict[str, Any]:
        s = self.batches.sampler
        return {"kind": "map", "step": self.step, "seed": s.seed, "global_batch_size": s.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.batches.sampler
        for key, mine in (("kind", "map"), ("seed", s.seed), ("global_batch_size", s.global_batch_size)):
            if state.get(key) != mine:
                raise ValueError(f"data position: {key} is {state.get(key)!r} in the checkpoint but {mine!r} now")
        self.step = int(state["step"])

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

Position: the dataset choices of step ``s`` come from a generator seeded by ``(seed, s)`` and the
permutation of epoch ``e`` of dataset ``d`` from one seeded by ``(seed, d, e)``, so both are computed
directly. What links the steps is ``counts[d]``, the rows of ``d`` drawn before step ``s``: a sum of ``s``
independent draws, with no closed form. The sampler therefore keeps them as its position:
:meth:`MixtureSampler.position` gives them (catching up from the nearest known step, one generator per
step, with a snapshot every :data:`SNAPSHOT_EVERY` steps), :meth:`MixtureSampler.restore` sets them, and
:class:`StepLoader` writes them into every checkpoint, so a resume costs the same at any step. A position
without them (a checkpoint from before) is recomputed from step 0, which gives the same batches.

A bad row (unreadable, missing image, ...) is replaced by the next row of the same dataset and
counted, so batches keep their size and stay deterministic. :class:`TrainBatches` builds, collates
and counts one rank's batch per step inside DataLoader workers; :class:`StepLoader` drives it and
exposes the position for checkpoints.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mmembed.data.collate import collate_problem, group_by_length
from mmembed.data.dataset import SampleDataset
from mmembed.data.sample import Sample
from mmembed.data.skips import BadSample, DataError, SkipCounter, error_marker, raise_marker

__all__ = ["MixtureSampler", "TrainBatches", "StepLoader", "SNAPSHOT_EVERY"]

SNAPSHOT_EVERY = 1024  # steps between the counts a sampler keeps while it catches up (random access back)


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
        self._cdf = self.probs.cumsum()  # what Generator.choice(n, p=probs) searches, bit for bit
        self._cdf /= self._cdf[-1]
        self._step = 0  # counts[d] = rows of dataset d used before self._step
        self._counts = np.zeros(len(sizes), dtype=np.int64)
        self._marks: dict[int, np.ndarray] = {0: self._counts.copy()}  # known counts by step
        self._mark_steps = [0]  # sorted keys of _marks
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _choices(self, step: int) -> np.ndarray:
        """The dataset of each position of step ``step``: ``rng.choice(n, size, p=probs)`` computed as numpy does
        (a uniform draw per position searched in the normalised cumulative weights), without its argument checks."""
        rng = np.random.default_rng([self.seed, step, 0x6D6978])
        if self.homogeneous:
            d = int(self._cdf.searchsorted(rng.random(), side="right"))
            return np.full(self.global_batch_size, d, dtype=np.int64)
        return self._cdf.searchsorted(rng.random(self.global_batch_size), side="right").astype(np.int64)

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(d)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, d, epoch, 0x7065726D])
            cached = (epoch, rng.permutation(self.sizes[d]))
            self._perms[d] = cached
        return cached[1]

    def _mark(self, step: int, counts: np.ndarray) -> None:
        if step not in self._marks:
            bisect.insort(self._mark_steps, step)
        self._marks[step] = counts.copy()

    def _seek(self, step: int) -> None:
        """Make ``self._counts`` the counts before ``step``: from the nearest known step at or below it."""
        base = self._mark_steps[bisect.bisect_right(self._mark_steps, step) - 1]
        if step < self._step or base > self._step:
            self._step, self._counts = base, self._marks[base].copy()
        n = len(self.sizes)
        while self._step < step:
            choices = self._choices(self._step)
            if self.homogeneous:
                self._counts[choices[0]] += self.global_batch_size
            else:
                self._counts += np.bincount(choices, minlength=n)
            self._step += 1
            if self._step % SNAPSHOT_EVERY == 0:
                self._mark(self._step, self._counts)

    def position(self, step: int) -> list[int]:
        """``counts[d]``: rows of dataset ``d`` drawn before ``step`` (what :meth:`restore` takes back)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not self.shuffle:
            return []
        self._seek(step)
        return [int(c) for c in self._counts]

    def restore(self, step: int, counts: list[int]) -> None:
        """Set the position at ``step`` (from :meth:`position`): later steps are computed from it, not from 0.

        Raises:
            ValueError: ``counts`` is not one count >= 0 per dataset adding up to ``step * global_batch_size``.
        """
        c = np.asarray(counts, dtype=np.int64)
        if step < 0 or c.shape != (len(self.sizes),) or (c < 0).any() or int(c.sum()) != step * self.global_batch_size:
            raise ValueError(
                f"data position: counts {list(counts)} at step {step} are not {len(self.sizes)} counts adding up to "
                f"step x global batch size = {step * self.global_batch_size}"
            )
        self._mark(step, c)
        self._step, self._counts = step, c

    def fingerprint(self) -> str:
        """What the counts depend on besides the seed: weights, batch size, homogeneity."""
        h = hashlib.sha256(self.probs.tobytes())
        h.update(f"{self.global_batch_size},{self.homogeneous},{self.shuffle},{len(self.sizes)}".encode())
        return h.hexdigest()[:16]

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
        self._seek(step)
        choices = self._choices(step)
        seen = self._counts.copy()
        out = []
        for d in choices.tolist():
            k = int(seen[d])
            seen[d] += 1
            size = self.sizes[d]
            out.append((d, int(self._perm(d, k // size)[k % size])))
        self._step, self._counts = step + 1, seen  # the next step starts here: its counts are these
        if self._step % SNAPSHOT_EVERY == 0:
            self._mark(self._step, seen)
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
    carry it (with the seed and global batch size, checked on load) into checkpoints, together with the
    sampler's per-dataset counts at that step (:meth:`MixtureSampler.position`), so that resuming at any
    step starts from there instead of recomputing the steps before it. ``skips`` accumulates the workers'
    skip counters.
    """

    def __init__(
        self, batches: TrainBatches, max_steps: int, start_step: int = 0, num_workers: int = 0, **loader_kw: Any
    ) -> None:
        self.batches, self.max_steps, self.step = batches, max_steps, start_step
        self.num_workers, self.loader_kw = num_workers, loader_kw
        self.skips = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Position the sampler here once: the workers get copies of it and start from this step.
        self.batches.sampler.position(min(self.step, self.max_steps))
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
        """``{"kind": "map", "step", "seed", "global_batch_size", "mix", "counts"}``; the counts are caught up from
        the last known step (the last call or the resumed one: the steps since then, one generator each)."""
        s = self.batches.sampler
        state: dict[str, Any] = {
            "kind": "map",
            "step": self.step,
            "seed": s.seed,
            "global_batch_size": s.global_batch_size,
        }
        if s.shuffle:
            state["mix"], state["counts"] = s.fingerprint(), s.position(self.step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. Counts saved for other weights (``mix`` differs) or none at all (an older
        checkpoint) are recomputed from step 0 instead, which yields the same batches."""
        s = self.batches.sampler
        for key, mine in (("kind", "map"), ("seed", s.seed), ("global_batch_size", s.global_batch_size)):
            if state.get(key) != mine:
                raise ValueError(f"data position: {key} is {state.get(key)!r} in the checkpoint but {mine!r} now")
        self.step = int(state["step"])
        if s.shuffle and state.get("counts") is not None and state.get("mix") == s.fingerprint():
            s.restore(self.step, state["counts"])

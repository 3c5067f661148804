"""Resume in constant time (#16): the map-style position is restored, not replayed, and gives the batches of the
replaying sampler bit for bit; a webdataset stream resumes from its cursor, buffer and generator state exactly."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmembed.data import MixtureSampler, Sample, Side, SkipCounter, StepLoader, TrainBatches, WdsLoader, WdsStream
from mmembed.data import wds_reader as wds_mod
from mmembed.data.mixing import SNAPSHOT_EVERY

# ---------------------------------------------------------------- map-style: the replaying sampler as it was


class ReplaySampler:
    """The sampler before #16 (320eea8), verbatim in what it draws: counts replayed from step 0."""

    def __init__(self, sizes: list[int], weights: list[float] | None, g: int, seed: int, homogeneous: bool) -> None:
        w = np.asarray(sizes if weights is None else weights, dtype=np.float64)
        self.sizes, self.probs, self.g, self.seed, self.homogeneous = sizes, w / w.sum(), g, seed, homogeneous

    def _choices(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, 0x6D6978])
        n = len(self.sizes)
        if self.homogeneous:
            return np.full(self.g, rng.choice(n, p=self.probs), dtype=np.int64)
        return rng.choice(n, size=self.g, p=self.probs)

    def batches(self, steps: int) -> tuple[list[list[tuple[int, int]]], list[list[int]]]:
        """The global batches of steps ``0..steps-1`` and the counts before each."""
        counts = np.zeros(len(self.sizes), dtype=np.int64)
        out, before = [], []
        for step in range(steps):
            before.append([int(c) for c in counts])
            batch = []
            for d in self._choices(step).tolist():
                k = int(counts[d])
                counts[d] += 1
                perm = np.random.default_rng([self.seed, d, k // self.sizes[d], 0x7065726D]).permutation(self.sizes[d])
                batch.append((d, int(perm[k % self.sizes[d]])))
            out.append(batch)
        return out, before


CONFIGS = [  # sizes, weights, global batch, seed, homogeneous: small datasets, so epochs turn over often
    ([7, 13, 3], [1.0, 2.0, 0.5], 8, 3, False),
    ([5, 11], None, 4, 0, True),
    ([9, 4, 6, 2], [0.0, 1.0, 3.0, 1.0], 6, 11, False),
    ([1], None, 3, 7, False),
]


@pytest.mark.parametrize("sizes, weights, g, seed, homogeneous", CONFIGS)
def test_direct_position_equals_replayed_position(sizes, weights, g, seed, homogeneous):
    steps = SNAPSHOT_EVERY + 250  # crosses the snapshots the sampler keeps while it catches up
    want, counts = ReplaySampler(sizes, weights, g, seed, homogeneous).batches(steps)
    rng = np.random.default_rng(seed)
    s = MixtureSampler(sizes, weights, global_batch_size=g, seed=seed, homogeneous=homogeneous)
    for step in rng.integers(0, steps, size=60).tolist():  # random access, back and forth
        assert s.global_batch(step) == want[step], step
        assert s.position(step) == counts[step]
    for step in rng.integers(0, steps, size=40).tolist():  # a fresh sampler restored there: nothing replayed
        fresh = MixtureSampler(sizes, weights, global_batch_size=g, seed=seed, homogeneous=homogeneous)
        fresh.restore(step, counts[step])
        assert [fresh.global_batch(t) for t in range(step, min(step + 5, steps))] == want[step : step + 5], step
    epochs = [c // n for c, n in zip(counts[-1], sizes)]
    assert max(epochs) >= 3  # the draws above crossed epoch boundaries of every dataset with a weight


class FakeRows:
    """A dataset of ``n`` rows that needs no files: row ``i`` is a Sample whose positive text names it."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def get(self, i: int, counter: SkipCounter, decode: bool = True) -> Sample:
        counter.ok()
        return Sample(query=Side(text=f"q {i}"), positive=Side(text=f"{self.name}:{i}"), dataset=self.name)


def _loader(max_steps: int, workers: int = 0, g: int = 8, start: int = 0) -> StepLoader:
    sampler = MixtureSampler([50, 300, 7], [1.0, 2.0, 1.0], global_batch_size=g, seed=5)
    batches = TrainBatches([FakeRows("a", 50), FakeRows("b", 300), FakeRows("c", 7)], sampler, decode=False)
    return StepLoader(batches, max_steps=max_steps, start_step=start, num_workers=workers)


def _texts(batches: list[dict[str, Any]]) -> list[list[str]]:
    return [[s.positive.text for s in b["samples"]] for b in batches]


def test_step_loader_resumes_from_the_saved_counts(monkeypatch):
    full = _texts(list(_loader(40)))
    first = _loader(40)
    it = iter(first)
    for _ in range(23):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as trainer_state.json holds it
    assert state["step"] == 23 and sum(state["counts"]) == 23 * 8 and len(state["mix"]) == 16
    drawn: list[int] = []
    original = MixtureSampler._choices
    monkeypatch.setattr(MixtureSampler, "_choices", lambda self, step: drawn.append(step) or original(self, step))
    for workers in (0, 2):
        drawn.clear()
        resumed = _loader(40, workers)
        resumed.load_state_dict(state)
        assert _texts(list(resumed)) == full[23:]
        if workers == 0:
            assert drawn == list(range(23, 40))  # one draw per step fetched: the 23 before were not replayed
    legacy = {k: v for k, v in state.items() if k not in ("counts", "mix")}  # a checkpoint from before #16
    resumed = _loader(40)
    resumed.load_state_dict(legacy)
    assert _texts(list(resumed)) == full[23:]  # recomputed from step 0: the same batches


def test_resume_far_in_draws_only_the_steps_it_fetches(monkeypatch):
    far = 6_000
    want, counts = ReplaySampler([50, 300, 7], [1.0, 2.0, 1.0], 2, 5, False).batches(far + 3)
    run = _loader(far + 3, g=2)
    run.step = far  # the run got there; its checkpoint holds the counts the sampler keeps
    state = json.loads(json.dumps(run.state_dict()))
    assert state["counts"] == counts[far]
    drawn: list[int] = []
    original = MixtureSampler._choices
    monkeypatch.setattr(MixtureSampler, "_choices", lambda self, step: drawn.append(step) or original(self, step))
    resumed = _loader(far + 3, g=2)
    resumed.load_state_dict(state)
    got = list(resumed)
    assert drawn == [far, far + 1, far + 2]  # nothing before the resumed step is drawn again
    names = ["a", "b", "c"]
    assert _texts(got) == [[f"{names[d]}:{i}" for d, i in want[t]] for t in range(far, far + 3)]
    assert resumed.state_dict()["counts"] == [
        c + sum(d == k for t in range(far, far + 3) for d, _ in want[t]) for k, c in enumerate(counts[far])
    ]


def test_counts_that_do_not_fit_are_refused_and_other_weights_replay():
    state = _loader(10).state_dict()
    assert state["counts"] == [0, 0, 0]
    with pytest.raises(ValueError, match="adding up to"):
        _loader(10).load_state_dict({**state, "step": 3})  # 3 steps of 8 rows are 24 rows, not 0
    with pytest.raises(ValueError, match="adding up to"):
        _loader(10).load_state_dict({**state, "counts": [0, 0]})
    first = _loader(10)
    for _ in zip(range(4), first):
        pass
    moved = {**first.state_dict(), "mix": "0" * 16}  # saved for other weights: ignored, recomputed
    resumed = _loader(10)
    resumed.load_state_dict(moved)
    assert _texts(list(resumed)) == _texts(list(_loader(10)))[4:]


def test_sequential_mode_has_no_counts():
    s = MixtureSampler([3, 2], global_batch_size=2, shuffle=False)
    assert s.position(5) == []
    loader = StepLoader(TrainBatches([FakeRows("a", 3), FakeRows("b", 2)], s, decode=False), max_steps=4)
    assert "counts" not in loader.state_dict()


# ---------------------------------------------------------------- webdataset: cursor, buffer, generator state


def write_shards(folder: Path, shards: int, per_shard: int, counts: bool = True) -> list[str]:
    """Text-only shards (``<key>.json`` and a ``<key>.txt``) of ``per_shard`` samples; ``shards.json`` optional."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, index = [], []
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s * per_shard, (s + 1) * per_shard):
                meta = {"query": {"text": f"q {i}"}, "positive": {"text": f"label {i}"}}
                for ext, data in (("json", json.dumps(meta).encode()), ("txt", f"extra {i}".encode() * (i % 7))):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(str(path))
        index.append({"name": path.name, "count": per_shard})
    if counts:
        (folder / "shards.json").write_text(json.dumps({"shards": index}))
    return paths


def old_raw(stream: WdsStream, g: int, total: int) -> list[dict[str, Any]]:
    """What the stream before #16 read (its ``_raw`` with nothing skipped): every sample through webdataset's
    own ``_shuffle``."""
    import webdataset as wds

    def plain():
        epoch = 0
        while True:
            for shard in stream._epoch_shards(epoch, g, total):
                yield from wds.tariterators.tarfile_samples([{"url": shard}], handler=lambda e: True)
            epoch += 1
            if not stream.resample:
                return

    it = plain()
    if stream.shuffle_buffer > 0:
        it = wds.filters._shuffle(it, stream.shuffle_buffer, stream.shuffle_buffer, seed=stream.seed * 100_003 + g)
    return [raw for _, raw in zip(range(400), it)]


def _reader(stream: WdsStream, g: int = 1, total: int = 2) -> wds_mod.StreamReader:
    return wds_mod.StreamReader(stream, g, total, SkipCounter())


@pytest.mark.parametrize("buffer, resample", [(0, True), (7, True), (7, False), (60, False)])
def test_stream_resumes_exactly_from_any_sample(tmp_path, buffer, resample):
    """From scratch the reader reads what the old stream read; restored after any sample it goes on with the
    same dicts (keys, urls, bytes), across shards, epochs, the buffer's drain and the end of a single pass."""
    paths = write_shards(tmp_path, 8, 6)
    stream = WdsStream(paths, batch_size=3, seed=4, shuffle_buffer=buffer, resample=resample)
    want = old_raw(stream, 1, 2)
    assert len(want) == (400 if resample else 24)
    reader = _reader(stream)
    it = iter(reader)
    states = [json.loads(json.dumps(reader.state()))]  # states[p]: after p samples, as a checkpoint holds it
    got = []
    for raw in it:
        got.append(raw)
        states.append(json.loads(json.dumps(reader.state())))
        if len(got) == len(want):
            break
    assert got == want
    rng = np.random.default_rng(buffer)
    for p in sorted({0, 1, len(want) - 1, len(want), *rng.integers(0, len(want), size=12).tolist()}):
        again = _reader(stream)
        assert again.restore(states[p])
        n = min(30, len(want) - p) if resample else 30  # want stops at 400 samples of an endless stream
        assert [raw for _, raw in zip(range(n), again)] == want[p : p + 30][:n], p


def test_resume_reads_a_bounded_number_of_samples(tmp_path, monkeypatch):
    """Resuming late reads the cursor's shard up to the cursor and the shards holding buffered samples, no more:
    the same at 10x the samples consumed."""
    per_shard, buffer = 10, 20
    paths = write_shards(tmp_path, 120, per_shard)
    stream = WdsStream(paths, batch_size=4, seed=1, shuffle_buffer=buffer, resample=True)
    reader = _reader(stream, 0, 1)
    states = {}
    for n, _ in enumerate(reader, start=1):
        if n in (300, 3000):
            states[n] = reader.state()
        if n == 3000:
            break
    read: list[str] = []
    original = wds_mod._shard_samples

    def counting(shard, handler):
        for raw in original(shard, handler):
            read.append(raw["__key__"])
            yield raw

    monkeypatch.setattr(wds_mod, "_shard_samples", counting)
    cost = {}
    for n, state in states.items():
        read.clear()
        again = _reader(stream, 0, 1)
        again.restore(state)
        next(iter(again))
        cost[n] = len(read)
        held = {(e, j) for e, j in zip(state["buffer"][0::3], state["buffer"][1::3])}
        assert cost[n] <= (len(held) + 1) * per_shard
    assert cost[3000] < 300 and cost[3000] <= 3 * cost[300], cost


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_matches_the_uninterrupted_run_with_its_skip_counts(tmp_path, workers):
    """Through WdsLoader (workers rotate on resume), with a truncated shard: the batches after the save and the
    skip counts before plus after it are those of the run that was not stopped."""
    paths = write_shards(tmp_path / "s", 8, 5)
    data = Path(paths[3]).read_bytes()
    Path(paths[3]).write_bytes(data[: data.index(b"000000017.json") + 600])  # a tar error inside sample 17
    counts = {p: 5 for p in paths}

    def make() -> WdsLoader:
        s = WdsStream(paths, batch_size=3, seed=2, shuffle_buffer=6, resample=True, shard_counts=counts)
        return WdsLoader(s, num_workers=workers, max_steps=30)

    full = make()
    want = _texts(list(full))
    for cut in (4, 11):
        first = make()
        head = _texts([b for _, b in zip(range(cut), first)])
        state = json.loads(json.dumps(first.state_dict()))
        assert set(state["streams"]) == {str(k) for k in state["raw"]}
        resumed = make()
        resumed.load_state_dict(state)
        assert head + _texts(list(resumed)) == want, cut
        skips = SkipCounter()
        skips.merge(first.skips.to_dict())
        skips.merge(resumed.skips.to_dict())
        assert skips.to_dict() == full.skips.to_dict() and full.skips.events["truncated_shard"] >= 2

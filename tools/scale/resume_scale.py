"""Resume cost against the position resumed at: map-style step 0 -> step 1M, webdataset N -> 10N samples consumed.

Map-style: three JSONL datasets mixed with weights 1:2:1, global batch 64 (``MixtureSampler``, ``TrainBatches``,
``StepLoader``, one process, no workers). A loader placed at step S writes its checkpoint position
(``state_dict()``; the time it takes is reported as ``save_state_s``), then a fresh loader, as a restarted run
builds it, restores it (``load_state_dict``) and produces its first batch: that time is the resume cost.
``work`` is the number of steps before the resume point, 1M against 0 (printed as 1e6); ``cost`` is
time(1M) / time(0), target 2.

Webdataset: text shards of 1,000 samples (each with 1 KiB of payload read with it, as image bytes are),
``shuffle_buffer`` 1,000 (the default), one stream. A loader consumes N samples (batches of 50), writes its
position, and a fresh loader restores it and produces its first batch. ``work`` = 10 (10N against N samples
consumed), ``cost`` = time(10N) / time(N). N = 10 buffers (10k samples; ``--quick``: buffer and shards of 200,
N = 2k): from there on the samples waiting in the buffer span a steady number of shards, which is what a
resume reads back (docs/data.md, "Resuming a stream").

Every row's ``extra`` holds ``checksum``, a sha256 prefix of the first resumed batch's sample ids in order
(``[small, large]``): equal checksums from two revisions mean they resume to identical batches.

    python tools/scale/resume_scale.py [--quick]        # JSON rows; tools/bench_scale.py prints them as a table

Uses only API that the older code has too (``SampleDataset``, ``DatasetSpec``, ``MixtureSampler``,
``TrainBatches``, ``StepLoader``, ``WdsStream``, ``WdsLoader``), so it runs against an earlier revision
(``PYTHONPATH=<worktree>``, from a neutral working directory) beside the current one.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

GLOBAL_BATCH = 64
SIZES = (10_000, 30_000, 5_000)
WEIGHTS = [1.0, 2.0, 1.0]
SEED = 7


def _checksum(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _first_ids(batch: dict[str, Any]) -> list[str]:
    """The samples' own ids (``label <dataset>-<row>`` / ``sample <n>``), not paths under the temporary folder."""
    return [s.positive.text if s.source.startswith("/") else s.source for s in batch["samples"]]


# ---------------------------------------------------------------- map-style


def write_jsonl(folder: Path) -> list[Path]:
    """One MMEB-train JSONL file per dataset, text only."""
    paths = []
    for d, n in enumerate(SIZES):
        path = folder / f"ds{d}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                row = {
                    "qry": f"query {d}-{i}",
                    "qry_image_path": "",
                    "pos_text": f"label {d}-{i}",
                    "pos_image_path": "",
                }
                row.update({"neg_text": f"wrong {d}-{i}", "neg_image_path": ""})
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


def _map_loader(paths: list[Path], max_steps: int) -> Any:
    from mmembed.data.dataset import SampleDataset
    from mmembed.data.manifest import DatasetSpec
    from mmembed.data.mixing import MixtureSampler, StepLoader, TrainBatches

    datasets = [SampleDataset(DatasetSpec(p.stem, [p])) for p in paths]
    sampler = MixtureSampler([len(d) for d in datasets], WEIGHTS, global_batch_size=GLOBAL_BATCH, seed=SEED)
    return StepLoader(TrainBatches(datasets, sampler, decode=False), max_steps=max_steps)


def map_resume(paths: list[Path], step: int) -> dict[str, Any]:
    """Position at ``step`` written, then restored by a fresh loader: times and the first batch's checksum."""
    run = _map_loader(paths, step + 1)
    run.step = step  # a run that got there
    t = time.perf_counter()
    state = json.loads(json.dumps(run.state_dict()))
    save = time.perf_counter() - t

    def once() -> tuple[float, dict[str, Any]]:
        fresh = _map_loader(paths, step + 1)  # a restarted run: nothing known but the checkpoint
        t = time.perf_counter()
        fresh.load_state_dict(state)
        batch = next(iter(fresh))
        return time.perf_counter() - t, batch

    resume, batch = _median(once)
    assert batch["step"] == step
    return {"resume_s": resume, "save_state_s": save, "checksum": _checksum(_first_ids(batch)), "state": state}


def _median(fn: Any, budget_s: float = 3.0) -> tuple[float, Any]:
    """Median time of up to 3 calls of ``fn() -> (seconds, result)``; one call when it alone takes ``budget_s``."""
    times, result = [], None
    for _ in range(3):
        dt, result = fn()
        times.append(dt)
        if sum(times) > budget_s:
            break
    return statistics.median(times), result


# ---------------------------------------------------------------- webdataset

WDS_BATCH = 50


def write_shards(folder: Path, samples: int, size: int) -> tuple[list[str], dict[str, int]]:
    """Text shards of ``size`` samples with a 1 KiB payload each, and their ``shards.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = bytes(range(256)) * 4
    paths, index = [], []
    for s in range(-(-samples // size)):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s * size, min(samples, (s + 1) * size)):
                meta = {"query": {"text": f"q {i}"}, "positive": {"text": f"label {i}"}, "source": f"sample {i}"}
                for ext, data in (("json", json.dumps(meta).encode()), ("bin", payload)):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(str(path))
        index.append({"name": path.name, "count": min(samples, (s + 1) * size) - s * size})
    (folder / "shards.json").write_text(json.dumps({"shards": index}))
    counts = {str(folder / e["name"]): e["count"] for e in index}
    return paths, counts


def _wds_loader(paths: list[str], counts: dict[str, int], buffer: int) -> Any:
    from mmembed.data.wds import WdsLoader, WdsStream

    stream = WdsStream(
        paths, batch_size=WDS_BATCH, seed=SEED, shuffle_buffer=buffer, resample=True, shard_counts=counts
    )
    return WdsLoader(stream, num_workers=0)


def wds_resume(paths: list[str], counts: dict[str, int], buffer: int, consumed: int) -> dict[str, Any]:
    """Consume ``consumed`` samples, write the position, restore it in a fresh loader: times and checksum."""
    run = _wds_loader(paths, counts, buffer)
    t = time.perf_counter()
    for n, _ in enumerate(run, start=1):
        if n * WDS_BATCH >= consumed:
            break
    reach = time.perf_counter() - t
    text = json.dumps(run.state_dict())

    def once() -> tuple[float, dict[str, Any]]:
        fresh = _wds_loader(paths, counts, buffer)
        t = time.perf_counter()
        fresh.load_state_dict(json.loads(text))
        batch = next(iter(fresh))
        return time.perf_counter() - t, batch

    resume, batch = _median(once)
    return {
        "resume_s": resume,
        "consume_s": reach,
        "state_bytes": len(text),
        "checksum": _checksum(_first_ids(batch)),
    }


# ---------------------------------------------------------------- rows


def measure(quick: bool = False) -> list[dict]:
    import mmembed

    code = str(Path(mmembed.__file__).resolve().parent)
    big_step = 100_000 if quick else 1_000_000
    buffer = 200 if quick else 1_000  # also the shard size
    small_n, large_n = 10 * buffer, 100 * buffer
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_jsonl(tmp)
        map_resume(paths, 0)  # warm: files opened, modules imported, before anything is measured
        a, b = map_resume(paths, 0), map_resume(paths, big_step)
        out.append(
            {
                "area": "resume",
                "what": f"map-style: first batch after resume at step {big_step:,} / at step 0",
                "work": float(big_step),  # steps before the resume point: big_step against 0
                "cost": b["resume_s"] / a["resume_s"],
                "target": 2.0,  # #16: resume at step 1M within 2x of resume at step 0
                "extra": {
                    "resume_s": [round(a["resume_s"], 4), round(b["resume_s"], 4)],
                    "save_state_s": [round(a["save_state_s"], 4), round(b["save_state_s"], 4)],
                    "us_per_step_before": round(1e6 * (b["resume_s"] - a["resume_s"]) / big_step, 3),
                    "checksum": [a["checksum"], b["checksum"]],
                    "state_keys": sorted(b["state"]),
                    "code": code,
                },
            }
        )
        shard_paths, counts = write_shards(tmp / "shards", large_n + 5 * buffer, buffer)
        c, d = wds_resume(shard_paths, counts, buffer, small_n), wds_resume(shard_paths, counts, buffer, large_n)
        out.append(
            {
                "area": "resume",
                "what": f"webdataset (buffer {buffer}): first batch after resume at {large_n:,} / {small_n:,} samples",
                "work": large_n / small_n,
                "cost": d["resume_s"] / c["resume_s"],
                "target": 2.0,
                "extra": {
                    "resume_s": [round(c["resume_s"], 4), round(d["resume_s"], 4)],
                    "consume_s": [round(c["consume_s"], 3), round(d["consume_s"], 3)],
                    "state_bytes": [c["state_bytes"], d["state_bytes"]],
                    "checksum": [c["checksum"], d["checksum"]],
                    "code": code,
                },
            }
        )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="step 100k instead of 1M; buffer 200: 2k/20k samples instead of 10k/100k"
    )
    for row in measure(ap.parse_args().quick):
        print(json.dumps(row))

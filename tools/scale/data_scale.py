"""Loader memory against the number of rows: 10k rows -> 1M rows (work x100), parquet and JSONL.

Each measurement runs in a fresh process that opens the file as training does (``SampleDataset``), parses 1,000
random rows, and reads its own memory from ``/proc/self/status``: ``VmRSS`` (what the process holds, mapped file
pages it touched included), ``RssAnon`` (its private memory: what a forked DataLoader worker may copy) and
``VmHWM`` (the peak while opening). The process starts from the same imports, so the ratio compares what the
loader adds on top of a training process's baseline; ``extra`` gives the megabytes behind it.

    python tools/scale/data_scale.py [--quick]          # JSON rows; tools/bench_scale.py prints them as a table

Uses only API that the older code has too (``SampleDataset``, ``DatasetSpec``), so ``tools/bench_scale.py`` can run
it against an earlier revision (``PYTHONPATH=<worktree>``) beside the current one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, random, sys
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out
from mmembed.data.dataset import SampleDataset
from mmembed.data.manifest import DatasetSpec
import mmembed.data.sources, pyarrow.parquet  # imported before the baseline is read
base = status()
ds = SampleDataset(DatasetSpec("d", [sys.argv[1]]))
rng = random.Random(0)
rows = [ds.parse(rng.randrange(len(ds))).positive.text for _ in range(1000)]
now = status()
print(json.dumps({"rows": len(ds), "base": base, "now": now, "check": rows[:3]}))
"""


def write_files(folder: Path, n: int) -> dict[str, Path]:
    """``n`` MMEB-train rows as ``rows.jsonl`` and ``rows.parquet`` (written with pyarrow, default row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "qry": [f"<|image_1|> Represent the given image for classification. item {i}" for i in range(n)],
        "qry_image_path": [f"images/{i % 5000}.jpg" for i in range(n)],
        "pos_text": [f"label {i % 1000}" for i in range(n)],
        "pos_image_path": [""] * n,
        "neg_text": [f"wrong {i % 997}" for i in range(n)],
        "neg_image_path": [""] * n,
    }
    table = pa.table(cols)
    pq.write_table(table, folder / "rows.parquet")
    with open(folder / "rows.jsonl", "w") as f:
        for r in table.to_pylist():
            f.write(json.dumps(r) + "\n")
    return {"parquet": folder / "rows.parquet", "jsonl": folder / "rows.jsonl"}


def _child(path: Path, cache: Path) -> dict:
    env = {**os.environ, "MMEMBED_CACHE": str(cache)}
    out = subprocess.run(  # cwd: not the checkout, so PYTHONPATH decides which mmembed is measured
        [sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True, text=True, cwd=cache.parent
    )
    if out.returncode:
        raise RuntimeError(f"{path}: the measuring process failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(quick: bool = False) -> list[dict]:
    """Rows ``{"area": "data memory", "what", "work", "cost", "extra"}``: cost = RssAnon(large) / RssAnon(small).

    Private memory is the measure because it is what each process (rank, DataLoader worker) pays on its own;
    mapped file pages (``rss_mb`` minus ``private_mb``) are shared by all of them and given back under pressure.
    """
    small, large = (10_000, 200_000) if quick else (10_000, 1_000_000)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for n in (small, large):
            (tmp / str(n)).mkdir()
            files[n] = write_files(tmp / str(n), n)
        for kind in ("parquet", "jsonl"):
            got = {}
            for n in (small, large):
                _child(files[n][kind], tmp / "cache")  # first open builds any cache; the second is measured
                got[n] = _child(files[n][kind], tmp / "cache")
            a, b = got[small], got[large]
            held = {n: got[n]["now"]["VmRSS"] - got[n]["base"]["VmRSS"] for n in got}
            out.append(
                {
                    "area": "data memory",
                    "what": f"{kind}: private memory at {large // 1000}k rows / {small // 1000}k",
                    "work": large / small,
                    "cost": b["now"]["RssAnon"] / a["now"]["RssAnon"],
                    "target": 1.5,  # #16: loader memory at 1M rows within 1.5x of 10k rows
                    "extra": {
                        "rss_mb": [round(a["now"]["VmRSS"], 1), round(b["now"]["VmRSS"], 1)],
                        "held_by_loader_mb": [round(held[small], 1), round(held[large], 1)],
                        "private_mb": [round(a["now"]["RssAnon"], 1), round(b["now"]["RssAnon"], 1)],
                        "peak_mb": [round(a["now"]["VmHWM"], 1), round(b["now"]["VmHWM"], 1)],
                        "bytes_per_row_held": round((held[large] - held[small]) * 2**20 / (large - small), 1),
                    },
                }
            )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k rows instead of 1M")
    for row in measure(ap.parse_args().quick):
        print(json.dumps(row))

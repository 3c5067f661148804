"""Query cost of ``tools/search.py`` against the number of indexed rows (work x10 -> cost xN).

For each size an index folder of random unit vectors is written (the layout both the older and the current code
read: ``index.faiss``, ``rows.jsonl``, ``meta.json``; plus ``rows.offsets.npy`` when :mod:`mmembed.index` exists),
then ``search()`` of the measured revision's ``tools/search.py`` answers the same queries with a fixed query
vector (an encoder stand-in, so that the model's time does not hide the index's). The cost is the median time
of one query (FAISS on one thread), the index opened anew each time, as the command line does; the current code
also reports a query against an index kept open (``mmembed.index.Index``) and the ``hnsw`` kind.

    python tools/scale/search_scale.py [--quick]        # JSON rows; tools/bench_scale.py prints them as a table
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class FixedQuery:
    """Stands in for the model: ``encode`` returns one fixed unit vector (the index is what is measured)."""

    def __init__(self, dim: int) -> None:
        v = np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)
        self.v = v / np.linalg.norm(v)

    def encode(self, **kw) -> np.ndarray:
        return self.v


def _search_tool():
    import mmembed

    path = Path(mmembed.__file__).resolve().parents[1] / "tools" / "search.py"
    spec = importlib.util.spec_from_file_location("_measured_search", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_index(folder: Path, n: int, dim: int, kind: str = "flat") -> None:
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = [{"id": str(i), "text": f"row {i}", "image": None} for i in range(n)]
    try:
        from mmembed.index import build_index
    except ImportError:  # the older code: the folder its tools/search.py wrote
        import faiss

        folder.mkdir(parents=True)
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        faiss.write_index(index, str(folder / "index.faiss"))
        (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "meta.json").write_text(json.dumps({"model": "fixed", "dim": dim, "count": n}))
        return
    build_index(x, rows, folder, kind=kind, meta={"model": "fixed"})


def _median_query(fn, repeats: int) -> float:
    fn()  # warm the page cache: both sizes are measured warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(quick: bool = False, dim: int = 64) -> list[dict]:
    import faiss

    # one thread: on a shared 2-core machine OpenMP's barrier waits turn a 0.2 ms query into a scheduler time
    # slice (16 ms at every size), and the ratio would measure the scheduler
    faiss.omp_set_num_threads(1)
    small, large = (10_000, 100_000) if quick else (100_000, 1_000_000)
    tool, enc = _search_tool(), FixedQuery(dim)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kinds = ["flat"]
        try:
            from mmembed.index import open_index

            kinds.append("hnsw")
        except ImportError:
            open_index = None
        for kind in kinds:
            got, kept, build = {}, {}, {}
            for n in (small, large):
                folder = tmp / f"{kind}-{n}"
                t = time.perf_counter()
                write_index(folder, n, dim, kind)
                build[n] = time.perf_counter() - t
                if kind == "flat":
                    got[n] = _median_query(lambda folder=folder: tool.search(folder, text="q", k=10, model=enc), 5)
                if open_index is not None:
                    index = open_index(folder)
                    kept[n] = _median_query(lambda index=index: index.search(enc.v, 10), 20)
                    index.close()
            if got:
                out.append(
                    {
                        "area": "search",
                        "what": f"{kind}: query (index opened per query) at {large // 1000}k / {small // 1000}k rows",
                        "work": large / small,
                        "cost": got[large] / got[small],
                        "extra": {"ms": [round(1e3 * got[small], 2), round(1e3 * got[large], 2)]},
                    }
                )
            if kept:
                out.append(
                    {
                        "area": "search",
                        "what": f"{kind}: query (index kept open) at {large // 1000}k / {small // 1000}k rows",
                        "work": large / small,
                        "cost": kept[large] / kept[small],
                        "extra": {
                            "ms": [round(1e3 * kept[small], 3), round(1e3 * kept[large], 3)],
                            "build_s": [round(build[small], 2), round(build[large], 2)],
                        },
                    }
                )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k -> 100k rows instead of 100k -> 1M")
    for row in measure(ap.parse_args().quick):
        print(json.dumps(row))

"""``mmembed serve`` throughput and latency at several batch windows, side by side (8 concurrent clients).

For each ``--batch-window-ms`` value a fresh ``mmembed serve`` process is started on a free loopback port (so the
clients and the server do not share one interpreter), warmed up, then sent ``--requests`` embedding requests from
``--clients`` closed-loop client threads (httpx, one connection each; :mod:`mmembed.serve.loadgen`). Printed: requests
per second, p50 / p99 latency, and the server's own batch sizes (its ``/metrics`` histogram, warm-up excluded).

    python tools/bench_serve.py                       # the tiny test model, built offline
    python tools/bench_serve.py --model-dir out/model --requests 4000 --windows 0,2,5,10

Every request carries one input (text; every ``--image-every``-th one an image with text); every answer is checked
to be one vector of the model's width, and failures are counted.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from mmembed.serve.loadgen import batch_sizes, run_load

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny" / "composed.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model_dir(folder: Path) -> Path:
    import torch

    import mmembed

    torch.manual_seed(0)
    return mmembed.build_model(TINY_RECIPE).eval().save(folder / "tiny")


def _image_url(seed: int) -> str:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _inputs(n: int, image_every: int) -> list[Any]:
    images = [_image_url(s) for s in range(4)] if image_every else []
    out: list[Any] = []
    for i in range(n):
        text = f"request {i}: a {['red', 'blue', 'green'][i % 3]} shape" + " on the left" * (i % 5)
        out.append(
            {"text": text, "image": images[i % 4]} if image_every and i % image_every == image_every - 1 else text
        )
    return out


class _Server:
    """``mmembed serve MODEL_DIR`` in a subprocess, up once ``/health`` answers."""

    def __init__(self, model_dir: Path, window_ms: float, args: argparse.Namespace) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mmembed.cli", "serve", str(model_dir), "--port", str(self.port)]
        cmd += ["--batch-window-ms", str(window_ms), "--max-batch", str(args.max_batch), "--log-level", "warning"]
        if args.torch_threads:
            cmd += ["--torch-threads", str(args.torch_threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("MMEMBED_API_KEY", None)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> _Server:
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mmembed serve exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mmembed serve did not come up in 120 s")
            time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench_window(model_dir: Path, window_ms: float, inputs: list[Any], args: argparse.Namespace) -> dict[str, float]:
    """One server at ``window_ms``: requests/s, p50/p99 ms, errors and batch sizes."""
    with _Server(model_dir, window_ms, args) as server:

        def make_sender() -> Any:
            http = httpx.Client(base_url=server.url, timeout=60)

            def send(i: int) -> int:
                r = http.post("/v1/embeddings", json={"input": [inputs[i]], "encoding_format": "base64"})
                r.raise_for_status()
                data = r.json()["data"]
                if len(data) != 1:
                    raise ValueError(f"{len(data)} embeddings for one input")
                return len(base64.b64decode(data[0]["embedding"])) // 4

            return send

        run_load(make_sender, min(len(inputs), 8 * args.clients), clients=args.clients)  # warm-up
        before = batch_sizes(httpx.get(f"{server.url}/metrics").text)
        result = run_load(make_sender, len(inputs), clients=args.clients)
        after = batch_sizes(httpx.get(f"{server.url}/metrics").text)
    widths = {w for w in result.results if w is not None}
    if len(widths) > 1:
        raise RuntimeError(f"answers of different widths: {sorted(widths)}")
    batches, rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
    return {
        "window_ms": window_ms,
        **result.summary(),
        "batches": batches,
        "mean_batch": rows / batches if batches else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="a saved model directory (default: the tiny model, built here)")
    p.add_argument("--requests", type=int, default=2000, help="timed requests per window")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--windows", default="0,5", help="comma-separated --batch-window-ms values")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--image-every", type=int, default=0, help="every Nth input an image with text (0: text only)")
    p.add_argument("--torch-threads", type=int, default=1, help="the server's torch threads (0: torch's default)")
    args = p.parse_args(argv)
    windows = [float(w) for w in args.windows.split(",") if w.strip()]
    inputs = _inputs(args.requests, args.image_every)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else _tiny_model_dir(Path(tmp))
        rows = [bench_window(model_dir, w, inputs, args) for w in windows]
    print(
        f"\nmmembed serve, {args.requests} requests of one input, {args.clients} concurrent clients, "
        f"{os.cpu_count()} CPUs, model {args.model_dir or 'tiny (recipes/tiny/composed.yaml)'}"
    )
    print(f"{'window ms':>9}  {'req/s':>7}  {'p50 ms':>7}  {'p99 ms':>7}  {'batches':>7}  {'mean batch':>10}  errors")
    for r in rows:
        print(
            f"{r['window_ms']:>9g}  {r['requests_per_s']:>7.0f}  {r['p50_ms']:>7.1f}  {r['p99_ms']:>7.1f}  "
            f"{r['batches']:>7.0f}  {r['mean_batch']:>10.2f}  {r['errors']:.0f}"
        )
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

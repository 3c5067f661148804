"""Load: 8 concurrent OpenAI clients; every answer is the embedding of its own request's input, none lost.

Latency percentiles and batch sizes are printed (``-s`` shows them), never asserted: they depend on the machine.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np

from mmembed.serve.loadgen import batch_sizes, run_load
from tests.serve.conftest import NAME, client, data_url, png_bytes, serving

COLORS = ["red", "blue", "green", "yellow", "purple", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]


def _inputs(n: int) -> tuple[list, list, list]:
    """Request inputs (every 8th one an image with text), and the aligned texts / images for ``model.encode``."""
    raws = [png_bytes(s, size=(32 + 4 * s, 40)) for s in range(4)]
    inputs, texts, images = [], [], []
    for i in range(n):
        text = f"request {i}: a {COLORS[i % 7]} {SHAPES[i % 4]}" + " on the left" * (i % 5)
        if i % 8 == 7:
            inputs.append({"text": text, "image": data_url(raws[i % 4])})
            images.append(raws[i % 4])
        else:
            inputs.append(text)
            images.append(None)
        texts.append(text)
    return inputs, texts, images


def _load(model, n: int, clients: int = 8) -> None:
    inputs, texts, images = _inputs(n)
    expected = model.encode(texts=texts, images=images, batch_size=64, show_progress_bar=False)
    with serving(model, batch_window_ms=5, max_batch=64) as (url, app):

        def make_sender():
            c = client(url, timeout=60)

            def send(i: int) -> np.ndarray:
                r = c.embeddings.create(model=NAME, input=[inputs[i]])  # base64 on the wire, decoded by the client
                assert len(r.data) == 1 and r.data[0].index == 0 and r.model == NAME
                return np.asarray(r.data[0].embedding, dtype=np.float32)

            return send

        result = run_load(make_sender, n, clients=clients)
        stats = batch_sizes(httpx.get(f"{url}/metrics").text)
        largest = app.state.batcher.largest
    assert not result.errors, f"{len(result.errors)} failed, e.g. {next(iter(result.errors.values()))!r}"
    got = np.stack(result.results)
    err = np.abs(got - expected).max(axis=1)
    assert (err <= 1e-5).all(), f"{int((err > 1e-5).sum())} answers are not their own input's embedding"
    s = result.summary()
    print(
        f"\nload: {n} requests from {clients} clients in {result.wall_s:.1f} s: {s['requests_per_s']:.0f} req/s, "
        f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms; {stats['batches']:.0f} batches, "
        f"mean {stats['mean']:.2f} inputs, largest {largest}"
    )


def test_load_200_requests(model) -> None:
    _load(model, 200)


def test_load_2000_requests(model) -> None:
    _load(model, 2000)


def test_base64_decodes_to_the_float_answer(model) -> None:
    with serving(model) as (url, _):
        body = {"model": NAME, "input": ["a red circle", "x"]}
        f = httpx.post(f"{url}/v1/embeddings", json={**body, "encoding_format": "float"}).json()
        b = httpx.post(f"{url}/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for fd, bd in zip(f["data"], b["data"]):
        decoded = np.frombuffer(base64.b64decode(bd["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, np.asarray(fd["embedding"], dtype=np.float32))

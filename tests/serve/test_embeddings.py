"""``POST /v1/embeddings`` through the official OpenAI client equals ``model.encode``; models, health, metrics."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.serve.conftest import KEY, NAME, client, data_url, png_bytes, serving

TEXTS = ["a red circle", "two blue squares on the left", "what color is the object?", "x"]


@pytest.fixture(scope="module")
def server(model):
    with serving(model, batch_window_ms=2) as (url, app):
        yield url, app


def _vectors(response) -> np.ndarray:
    """The response's vectors; an explicit ``encoding_format="base64"`` leaves them encoded (little-endian float32)."""
    assert [d.index for d in response.data] == list(range(len(response.data)))
    rows = [
        np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") if isinstance(d.embedding, str) else d.embedding
        for d in response.data
    ]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_text_equals_encode(server, model, encoding_format) -> None:
    url, _ = server
    r = client(url).embeddings.create(model=NAME, input=TEXTS, encoding_format=encoding_format)
    assert r.object == "list" and r.model == NAME and r.data[0].object == "embedding"
    assert r.usage.prompt_tokens == r.usage.total_tokens > len(TEXTS)
    np.testing.assert_allclose(_vectors(r), model.encode(texts=TEXTS), atol=1e-5, rtol=0)
    one = client(url).embeddings.create(model=NAME, input="a red circle")  # a single string, base64 by default
    np.testing.assert_allclose(_vectors(one), model.encode(texts=TEXTS[:1]), atol=1e-5, rtol=0)


def test_dimensions_instruction_and_prompt_name(server, model) -> None:
    url, _ = server
    c = client(url)
    r = c.embeddings.create(model=NAME, input=TEXTS, dimensions=16)
    np.testing.assert_allclose(_vectors(r), model.encode(texts=TEXTS, truncate_dim=16), atol=1e-5, rtol=0)
    r = c.embeddings.create(model=NAME, input=TEXTS, extra_body={"instruction": "Find the caption."})
    want = model.encode(texts=TEXTS, instruction="Find the caption.")
    np.testing.assert_allclose(_vectors(r), want, atol=1e-5, rtol=0)
    r = c.embeddings.create(model=NAME, input=TEXTS, extra_body={"prompt_name": "query"})
    np.testing.assert_allclose(_vectors(r), model.encode(texts=TEXTS, prompt_name="query"), atol=1e-5, rtol=0)
    assert not np.allclose(_vectors(r), model.encode(texts=TEXTS), atol=1e-4)  # the prompt did change them


def test_images_and_image_text_equal_encode(server, model) -> None:
    url, _ = server
    raws = [png_bytes(1), png_bytes(2, size=(64, 30)), png_bytes(3, size=(30, 50))]
    urls = [data_url(b) for b in raws]
    inputs = [
        {"image": urls[0]},  # the simple form: image only
        {"text": "what color is it?", "image": urls[1]},  # image + text
        {"text": "a photo", "image": urls[2].split(",", 1)[1], "instruction": "Represent the image."},  # bare base64
        {  # vLLM's chat form: image then text
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": urls[1]}},
                        {"type": "text", "text": "what color is it?"},
                    ],
                }
            ]
        },
        {  # system text is the instruction; an image after text stands where it is
            "messages": [
                {"role": "system", "content": "Represent the image."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "left"},
                        {"type": "image_url", "image_url": {"url": urls[0]}},
                        {"type": "text", "text": "right"},
                        {"type": "image_url", "image_url": urls[2]},
                    ],
                },
            ]
        },
        "plain text in the same request",
    ]
    r = client(url).embeddings.create(model=NAME, input=inputs, encoding_format="float")
    ph = model.processor.placeholder
    want = model.encode(
        texts=[None, "what color is it?", "a photo", "what color is it?", f"left {ph} right {ph}", inputs[-1]],
        images=[raws[0], raws[1], raws[2], raws[1], [raws[0], raws[2]], None],
        instruction=[None, None, "Represent the image.", None, "Represent the image.", None],
    )
    got = _vectors(r)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1], got[3], atol=1e-6)  # the two forms are the same input


def test_models_health_and_metrics(server) -> None:
    url, app = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].object == "model"
    assert client(url).models.retrieve(NAME).id == NAME
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["model"] == NAME and h["queue_depth"] == 0
    client(url).embeddings.create(model=NAME, input=TEXTS)
    text = httpx.get(f"{url}/metrics").text
    for line in (
        'mmembed_requests_total{endpoint="/v1/embeddings",status="200"}',
        "mmembed_request_latency_seconds_bucket",
        "mmembed_batch_size_count",
        "mmembed_queue_depth 0.0",
        "mmembed_inputs_total",
    ):
        assert line in text, line
    assert app.state.batcher.rows >= len(TEXTS) and app.state.batcher.batches >= 1


def test_search_over_an_index(model, tmp_path) -> None:
    from mmembed.index import build_index, open_index

    docs = [f"document {i}: a {c} {s}" for i, (c, s) in enumerate(zip(["red", "blue", "green"] * 4, ["circle"] * 12))]
    rows = [{"id": f"d{i}", "text": t, "image": None} for i, t in enumerate(docs)]
    build_index(model.encode(texts=docs), rows, tmp_path / "idx")
    with open_index(tmp_path / "idx") as index, serving(model, index=index, api_key=KEY) as (url, _):
        headers = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(f"{url}/v1/search", json={"query": docs[4], "k": 3}, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        q = model.encode(texts=[docs[4]], prompt_name="query")  # a search query gets the saved query prompt
        want = index.search(q, 3)[0]
        assert [h["id"] for h in body["data"]] == [h["id"] for h in want]
        np.testing.assert_allclose([h["score"] for h in body["data"]], [h["score"] for h in want], atol=1e-5)
        assert body["data"][0]["rank"] == 1 and body["model"] == NAME and body["usage"]["prompt_tokens"] > 0
        img = httpx.post(f"{url}/v1/search", json={"query": {"image": data_url(png_bytes(5))}}, headers=headers)
        assert img.status_code == 200 and len(img.json()["data"]) == 5
        assert httpx.post(f"{url}/v1/search", json={"query": docs[0]}).status_code == 401
        bad = httpx.post(f"{url}/v1/search", json={"query": [], "k": 3}, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "query"
        assert httpx.post(f"{url}/v1/search", json={"query": "x", "k": 0}, headers=headers).status_code == 400

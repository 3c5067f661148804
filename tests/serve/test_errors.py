"""Auth, bad input, full queue, timeouts and model failures: each a 4xx/5xx JSON error, the server keeps serving."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import openai
import pytest

from tests.serve.conftest import KEY, NAME, Gate, client, data_url, png_bytes, serving

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(model):
    with serving(model, api_key=KEY, batch_window_ms=1, max_request_bytes=200_000, max_image_pixels=10_000) as s:
        yield s


def _is_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _still_serves(url: str, model) -> None:
    r = httpx.post(f"{url}/v1/embeddings", json={"model": NAME, "input": ["still here"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(got, model.encode(texts=["still here"])[0], atol=1e-5, rtol=0)


def test_auth(server, model) -> None:
    url, _ = server
    body = {"model": NAME, "input": "x"}
    err = _is_error(httpx.post(f"{url}/v1/embeddings", json=body), 401, "invalid_api_key")
    assert "Missing API key" in err["message"]
    wrong = httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
    assert _is_error(wrong, 401, "invalid_api_key") and wrong.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/metrics"):
        _is_error(httpx.get(f"{url}{path}"), 401)
    assert httpx.get(f"{url}/health").status_code == 200  # the one open route
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").embeddings.create(model=NAME, input="x")
    assert len(client(url, KEY).embeddings.create(model=NAME, input="x").data) == 1
    _still_serves(url, model)


_BIG = data_url(png_bytes(1, size=(200, 100)))  # 20,000 pixels: over the test server's limit of 10,000

BAD = {
    "empty list": ({"input": []}, 400, None),
    "empty string": ({"input": ""}, 400, None),
    "blank item": ({"input": ["ok", "  "]}, 400, None),
    "no input": ({"model": NAME}, 400, None),
    "wrong model": ({"model": "gpt-4", "input": "x"}, 404, "model_not_found"),
    "bad base64": ({"input": [{"image": "data:image/png;base64,@@not base64@@"}]}, 400, "invalid_base64"),
    "truncated base64": ({"input": [{"image": "data:image/png;base64,iVBORw0KGgo"}]}, 400, None),
    "not an image": ({"input": [{"image": data_url(b"hello, world")}]}, 400, "invalid_image"),
    "text media type": ({"input": [{"image": data_url(b"hi", "text/plain")}]}, 400, "invalid_image"),
    "remote url": ({"input": [{"image": "http://example.com/cat.png"}]}, 400, "invalid_image_url"),
    "remote url in messages": (
        {
            "input": [
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}]}
            ]
        },
        400,
        "invalid_image_url",
    ),
    "unknown part type": ({"input": [{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}]}, 400, None),
    "unknown field": ({"input": [{"txt": "typo"}]}, 400, None),
    "token ids": ({"input": [1, 2, 3]}, 400, None),
    "number": ({"input": 3.5}, 400, None),
    "dimensions too large": ({"input": "x", "dimensions": 65}, 400, None),
    "bad encoding_format": ({"input": "x", "encoding_format": "int8"}, 400, None),
    "unknown prompt_name": ({"input": "x", "prompt_name": "nope"}, 400, None),
    "two instructions": ({"input": "x", "prompt_name": "query", "instruction": "y"}, 400, None),
    "placeholders without images": ({"input": [{"text": "<image> and <image>"}]}, 400, "invalid_input"),
    "image over the pixel limit": ({"input": [{"image": _BIG}]}, 413, "image_too_large"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(server, model, name) -> None:
    url, _ = server
    body, status, code = BAD[name]
    _is_error(httpx.post(f"{url}/v1/embeddings", json=body, headers=AUTH), status, code)
    _still_serves(url, model)


def test_bad_json_oversized_body_and_unknown_path(server, model) -> None:
    url, _ = server
    headers = {**AUTH, "content-type": "application/json"}
    _is_error(httpx.post(f"{url}/v1/embeddings", content=b'{"input": ', headers=headers), 400)
    _is_error(httpx.post(f"{url}/v1/embeddings", json={"input": "x" * 300_000}, headers=AUTH), 413, "request_too_large")
    chunks = (b"x" * 50_000 for _ in range(6))  # no Content-Length: counted while read
    _is_error(httpx.post(f"{url}/v1/embeddings", content=chunks, headers=headers), 413, "request_too_large")
    _is_error(httpx.get(f"{url}/v2/nothing", headers=AUTH), 404)
    _is_error(httpx.get(f"{url}/v1/embeddings", headers=AUTH), 405)
    with pytest.raises(openai.NotFoundError):
        client(url, KEY).embeddings.create(model="other", input="x")
    _still_serves(url, model)


def test_a_refused_row_fails_only_its_request(model) -> None:
    """A bad row batched with good ones: only its request gets 400; the others get their own vectors."""
    gate = Gate(model)
    with serving(gate, batch_window_ms=0) as (url, app):
        bodies = [{"input": "warm"}, {"input": ["good one", "good two"]}, {"input": [{"text": "<image> <image>"}]}]
        bodies.append({"input": "three"})
        out: dict[int, httpx.Response] = {}

        def post(i: int) -> None:
            out[i] = httpx.post(f"{url}/v1/embeddings", json=bodies[i], timeout=30)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        threads[0].start()
        assert gate.entered.wait(10)  # the worker is busy with "warm": the next three queue up
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 10
        while app.state.batcher.depth < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        gate.release.set()
        for t in threads:
            t.join()
        assert app.state.batcher.batches == 2 and app.state.batcher.largest == 4  # the three went in one batch
        err = _is_error(out[2], 400, "invalid_input")
        assert err["message"].startswith("input[0]: ")
        got = [np.array(d["embedding"]) for i in (1, 3) for d in out[i].json()["data"]]
        np.testing.assert_allclose(got, model.encode(texts=["good one", "good two", "three"]), atol=1e-5, rtol=0)


def test_a_full_queue_answers_503(model) -> None:
    gate = Gate(model)
    with serving(gate, max_queue=1, batch_window_ms=0) as (url, app):
        results: dict[str, httpx.Response] = {}

        def post(name: str) -> None:
            results[name] = httpx.post(f"{url}/v1/embeddings", json={"input": name}, timeout=30)

        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert gate.entered.wait(10)  # the worker holds "first" in the model
        second = threading.Thread(target=post, args=("second",))
        second.start()
        deadline = time.monotonic() + 10
        while app.state.batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        full = httpx.post(f"{url}/v1/embeddings", json={"input": "third"})
        _is_error(full, 503, "queue_full")
        assert full.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError):  # the client sees a 503 as well
            client(url).embeddings.create(model=NAME, input="fourth")
        gate.release.set()
        first.join()
        second.join()
        for name in ("first", "second"):
            assert results[name].status_code == 200
            got = results[name].json()["data"][0]["embedding"]
            np.testing.assert_allclose(got, model.encode(texts=[name])[0], atol=1e-5, rtol=0)
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "after"}).status_code == 200
        assert 'mmembed_rejected_total{reason="queue_full"} 2.0' in httpx.get(f"{url}/metrics").text


def test_timeout_answers_504_and_a_failing_model_500(model) -> None:
    gate = Gate(model)
    with serving(gate, timeout_s=0.3, batch_window_ms=0) as (url, _):
        _is_error(httpx.post(f"{url}/v1/embeddings", json={"input": "slow"}), 504, "timeout")
        gate.release.set()
        gate.fail = RuntimeError("out of memory")
        err = _is_error(httpx.post(f"{url}/v1/embeddings", json={"input": "boom"}), 500)
        assert "out of memory" in err["message"] and err["type"] == "server_error"
        gate.fail = None
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "fine"})
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], model.encode(texts=["fine"])[0], atol=1e-5)

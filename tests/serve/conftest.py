"""Fixtures of the server tests: the tiny model saved and loaded offline, servers on free loopback ports."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

NAME = "tiny"
KEY = "test-key"


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the server's worker shares 2 cores with the clients, torch's spinning threads would not."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(_tiny_model, tmp_path_factory) -> Path:
    """The tiny composed model saved as a model directory (what ``mmembed serve`` loads)."""
    return _tiny_model.save(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def model(model_dir):
    import mmembed

    return mmembed.load(model_dir)


def png_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    from tests.conftest import make_image

    buf = io.BytesIO()
    make_image(seed, size=size).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields ``http://127.0.0.1:PORT``."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def serving(model: Any, index: Any = None, **config: Any) -> Iterator[tuple[str, Any]]:
    """``(base_url, app)`` of a server over ``model`` with :class:`ServeConfig` fields ``config``."""
    from mmembed.serve import ServeConfig, create_app

    app = create_app(model, ServeConfig(served_model_name=NAME, **config), index=index)
    with running(app) as url:
        yield url, app


def client(url: str, key: str = "none", **kw: Any):
    """The official OpenAI client pointed at ``url``."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)


class Gate:
    """A model whose ``encode`` waits for :attr:`release` (or raises :attr:`fail`): a slow or failing model."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        if not self.release.wait(30):
            raise RuntimeError("gate never released")
        if self.fail is not None:
            raise self.fail
        return self._model.encode(*args, **kwargs)

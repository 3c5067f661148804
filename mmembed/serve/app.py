"""The ASGI app of ``mmembed serve``: OpenAI-compatible embeddings, search over an index, health and metrics.

``create_app(model, ServeConfig(...), index=None)`` returns a FastAPI app; its lifespan starts and stops the
:class:`~mmembed.serve.batcher.Batcher` worker that owns the model. Routes (docs/serve.md):

- ``POST /v1/embeddings``: OpenAI's request and response (``encoding_format`` float or base64, ``dimensions`` =
  ``truncate_dim``), plus ``instruction`` / ``prompt_name`` and multimodal input objects;
- ``POST /v1/search`` (with an index): one query -> the top ``k`` rows of the index with their scores;
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (never needs the key), ``GET /metrics``.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 bad input, 401 missing or wrong
key, 404 unknown model (``model_not_found``) or path, 413 request or image too large, 503 queue full (with
``Retry-After``), 504 request timeout, 500 a model failure. The server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmembed import api
from mmembed.images import DEFAULT_MAX_PIXELS
from mmembed.serve.batcher import Batcher, QueueFull
from mmembed.serve.inputs import Item, ServeError, parse_input
from mmembed.serve.metrics import CONTENT_TYPE_LATEST, Metrics

__all__ = ["ServeConfig", "create_app", "EmbeddingRequest", "SearchRequest"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class ServeConfig:
    """The server's settings (the ``mmembed serve`` options of the same names)."""

    served_model_name: str = "mmembed"
    api_key: str | None = None
    batch_window_ms: float = 5.0
    max_batch: int = 64
    max_queue: int = 256
    max_request_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 60.0
    max_inputs: int = 2048
    #: images with more pixels are refused (413) before decoding; default the model's own limit
    max_image_pixels: int | None = None
    max_k: int = 1000


class EmbeddingRequest(BaseModel):
    """OpenAI's ``POST /v1/embeddings`` body plus mmembed's ``instruction`` / ``prompt_name``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Any = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    instruction: str | None = None
    prompt_name: str | None = None


class SearchRequest(BaseModel):
    """``POST /v1/search``: one query (a string or an input object, as one ``input`` item) and ``k``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: Any = None
    k: int = Field(5, ge=1)
    instruction: str | None = None
    prompt_name: str | None = None


def _error(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None) -> Response:
    return JSONResponse(ServeError(status, message, type=type, code=code).body(), status_code=status)


class _Guard:
    """Pure ASGI middleware: request metrics, the API key and the request-size limit, before any parsing."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self._expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, path = time.perf_counter(), 500, scope.get("path", "")

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self._expected is not None and path != "/health":
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, self._expected):
                    what = "Incorrect API key provided" if given else "Missing API key: send Authorization: Bearer KEY"
                    resp = _error(401, what, code="invalid_api_key")
                    resp.headers["WWW-Authenticate"] = "Bearer"
                    await resp(scope, receive, send_status)
                    return
            limit = self.config.max_request_bytes
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                too_big = _error(413, f"request body larger than the limit of {limit} bytes", code="request_too_large")
                length = headers.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    await too_big(scope, receive, send_status)
                    return
                chunks, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        await too_big(scope, receive, send_status)
                        return
                    chunks.append(chunk)
                    more = bool(message.get("more_body"))
                body, replayed = b"".join(chunks), False

                async def replay() -> Message:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(path, status, time.perf_counter() - start)


def _encode_vector(vec: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's: little-endian float32 bytes, base64
        return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return vec.tolist()


def create_app(model: Any, config: ServeConfig | None = None, index: Any = None) -> FastAPI:
    """The FastAPI app serving ``model`` (an :class:`~mmembed.model.EmbeddingModel`) and, optionally, ``index``
    (an open :class:`mmembed.index.Index` whose vectors the model's embeddings can query)."""
    cfg = config or ServeConfig()
    metrics = Metrics()
    batcher = Batcher(
        model, max_batch=cfg.max_batch, window_ms=cfg.batch_window_ms, max_queue=cfg.max_queue, metrics=metrics
    )
    name, created = cfg.served_model_name, int(time.time())
    prompts = dict(getattr(model.cfg, "prompts", {}) or {})
    placeholder = getattr(model.processor, "placeholder", "<image>")
    max_pixels = cfg.max_image_pixels or getattr(model.processor, "max_pixels", DEFAULT_MAX_PIXELS)
    full_dim, default_dim = int(model.embed_dim), getattr(model, "truncate_dim", None)
    index_lock = threading.Lock()
    if index is not None and index.dim > full_dim:
        raise ValueError(f"the index has dimension {index.dim} but the model's embeddings have {full_dim}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="mmembed serve", version="1", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.config = batcher, metrics, cfg

    @app.exception_handler(ServeError)
    async def serve_error(request: Any, exc: ServeError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Any, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        message = f"{where}: {first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", None
        return JSONResponse(ServeError(400, message, param=where).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Any, exc: StarletteHTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ServeError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Any, exc: Exception) -> Response:
        err = ServeError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise ServeError(
                404, f"The model '{requested}' does not exist; this server serves '{name}'", param="model",
                code="model_not_found",
            )  # fmt: skip

    def instructions(items: list[Item], instruction: str | None, prompt_name: str | None, role: str | None) -> list:
        """Each row's instruction: its own, else the request's (saved prompt names looked up, as in ``encode``)."""
        try:
            shared = api.resolve_instruction(prompts, instruction, None, prompt_name)
        except ValueError as e:
            raise ServeError(400, str(e), param="prompt_name" if prompt_name else "instruction") from None
        if shared is None and role is not None:
            saved = api.role_prompt(prompts, role)
            shared = prompts[saved] if saved else None
        return [prompts.get(it.instruction, it.instruction) if it.instruction is not None else shared for it in items]

    async def embed(items: list[Item], insts: list[str | None], deadline: float) -> tuple[np.ndarray, int]:
        try:
            job = batcher.submit(items, insts)
        except QueueFull as e:
            raise ServeError(
                503, f"{e}; retry later", type="server_error", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        waiter = asyncio.wrap_future(job.future)
        try:
            return await asyncio.wait_for(waiter, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            job.future.cancel()
            metrics.rejected.labels("timeout").inc()
            raise ServeError(
                504, f"the request took longer than {cfg.timeout_s:g} s", type="timeout", code="timeout"
            ) from None

    async def parse(value: Any) -> list[Item]:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return parse_input(value, placeholder, max_inputs=cfg.max_inputs, max_pixels=max_pixels)
        return await run_in_threadpool(  # images are decoded off the event loop
            parse_input, value, placeholder, max_inputs=cfg.max_inputs, max_pixels=max_pixels
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "queue_depth": batcher.depth, "index": index is not None}

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "mmembed"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> Response:
        deadline = time.monotonic() + cfg.timeout_s
        check_model(req.model)
        try:
            dim = api.check_truncate_dim(req.dimensions, full_dim, key="dimensions") or default_dim
        except ValueError as e:
            raise ServeError(400, str(e), param="dimensions") from None
        items = await parse(req.input)
        emb, tokens = await embed(items, instructions(items, req.instruction, req.prompt_name, None), deadline)
        emb = api.truncate_embeddings(emb, dim)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(v, req.encoding_format)}
            for i, v in enumerate(emb)
        ]
        body = {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    if index is not None:

        def search_index(vector: np.ndarray, k: int) -> list[dict[str, Any]]:
            with index_lock:  # the index reads its rows through one file handle
                return index.search(vector[None, : index.dim], k)[0]

        @app.post("/v1/search")
        async def search(req: SearchRequest) -> Response:
            deadline = time.monotonic() + cfg.timeout_s
            check_model(req.model)
            if req.k > cfg.max_k:
                raise ServeError(400, f"k={req.k} is more than the limit {cfg.max_k}", param="k")
            if req.query is None or isinstance(req.query, list):
                raise ServeError(400, "'query' must be a string or one input object", param="query")
            items = await parse([req.query])
            emb, tokens = await embed(items, instructions(items, req.instruction, req.prompt_name, "query"), deadline)
            hits = await run_in_threadpool(search_index, emb[0], req.k)
            body = {
                "object": "list",
                "data": hits,
                "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return Response(json.dumps(body, ensure_ascii=False), media_type="application/json")

    app.add_middleware(_Guard, config=cfg, metrics=metrics)
    return app

"""``mmembed serve MODEL_DIR``: the options and the runner (uvicorn, one process, one model worker thread).

Kept apart from :mod:`mmembed.cli` so that the ``mmembed`` command imports neither FastAPI nor uvicorn until
``serve`` runs; both come with the ``serve`` extra (``pip install 'mmembed[serve]'``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "EPILOG"]

EPILOG = """\
examples:
  mmembed serve out/model                              # http://127.0.0.1:8000/v1/embeddings
  MMEMBED_API_KEY=secret mmembed serve out/model --host 0.0.0.0 --port 8080
  mmembed serve out/model --index out/index            # adds POST /v1/search

OpenAI client: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "none").embeddings.create(
  model=NAME, input=[...]). Input forms, batching, limits and metrics: docs/serve.md.
"""


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value:g}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` options (each help names its default)."""
    from mmembed.cli import _positive_int as _positive  # at parser-build time: mmembed.cli imports this module

    p.add_argument("model_dir", help="a saved model directory")
    p.add_argument("--index", default=None, help="an mmembed.index folder to serve POST /v1/search over")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $MMEMBED_API_KEY, else none)",
    )
    p.add_argument("--served-model-name", default=None, help="model id of the API (default: the directory's name)")
    p.add_argument(
        "--batch-window-ms",
        type=_non_negative,
        default=5.0,
        help="how long the worker waits for more requests to batch with the first (0: what is queued now)",
    )
    p.add_argument("--max-batch", type=_positive, default=64, help="most inputs encoded in one batch")
    p.add_argument("--max-queue", type=_positive, default=256, help="most requests waiting; the next is answered 503")
    p.add_argument(
        "--max-request-bytes", type=_positive, default=32 * 1024 * 1024, help="larger request bodies get 413"
    )
    p.add_argument("--timeout-s", type=_non_negative, default=60.0, help="a request not answered by then gets 504")
    p.add_argument("--max-inputs", type=_positive, default=2048, help="most inputs in one request (OpenAI's 2048)")
    p.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=None,
        help="images with more pixels get 413, checked before decoding (default: the model's limit)",
    )
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="cast the weights")
    p.add_argument(
        "--torch-threads", type=_positive, default=None, help="torch intra-op threads (default: torch's own)"
    )
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run the directory's code")
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"), help="uvicorn's"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Load the model (and index), build the app and serve it until interrupted."""
    from mmembed.cli import UsageError

    try:
        import uvicorn

        from mmembed.serve.app import ServeConfig, create_app
    except ImportError as e:
        raise UsageError(f"mmembed serve needs the serve extra (pip install 'mmembed[serve]'): {e}") from None
    import torch

    import mmembed

    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: not a model directory")
    api_key = args.api_key or os.environ.get("MMEMBED_API_KEY") or None
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model = mmembed.load(model_dir, device=args.device, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    index: Any = None
    if args.index:
        from mmembed.index import open_index

        index = open_index(args.index)
    name = args.served_model_name or model_dir.resolve().name
    config = ServeConfig(
        served_model_name=name,
        api_key=api_key,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        timeout_s=args.timeout_s,
        max_inputs=args.max_inputs,
        max_image_pixels=args.max_image_pixels,
    )
    try:
        app = create_app(model, config, index)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not _is_loopback(args.host) and not api_key:
        print(
            f"mmembed serve: warning: listening on {args.host} without an API key (--api-key or MMEMBED_API_KEY)",
            file=sys.stderr,
        )
    search = f", search over {args.index} ({index.count} rows)" if index is not None else ""
    print(f"mmembed serve: model '{name}' on http://{args.host}:{args.port}/v1{search}", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        if index is not None:
            index.close()
    return 0

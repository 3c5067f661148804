"""``mmembed serve``: an OpenAI-compatible embedding server with dynamic batching (docs/serve.md).

``create_app(model, ServeConfig(...), index=None)`` builds the FastAPI app (the ``serve`` extra:
``pip install 'mmembed[serve]'``); ``mmembed serve MODEL_DIR`` runs it under uvicorn. Importing this package
imports neither FastAPI nor the model: the names below load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "ServeConfig", "Batcher"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "ServeConfig"):
        from mmembed.serve import app

        return getattr(app, name)
    if name == "Batcher":
        from mmembed.serve.batcher import Batcher

        return Batcher
    raise AttributeError(f"module 'mmembed.serve' has no attribute {name!r}")

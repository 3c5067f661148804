"""mmembed: train and serve multimodal embedding models.

```python
import mmembed
model = mmembed.build_model("recipes/tiny/composed.yaml")
emb = model.encode(texts=["a red circle", None], images=[None, "cat.png"], instruction="Represent the input.")
model.save("out/model"); same = mmembed.load("out/model")
```
"""

from __future__ import annotations

# the built-in components register their names when imported (the registry imports none of them)
from mmembed import backbones, connectors, encoders, losses, pooling, tokens  # noqa: F401
from mmembed.api import quantize_embeddings, truncate_embeddings
from mmembed.build import build_model, load
from mmembed.model import EmbeddingModel
from mmembed.registry import ALL

__version__ = "0.1.0"

__all__ = [
    "build_model",
    "load",
    "EmbeddingModel",
    "list_components",
    "quantize_embeddings",
    "truncate_embeddings",
    "__version__",
]


def list_components() -> dict[str, list[str]]:
    """Registered component names per slot, e.g. ``{"connector": ["mlp", ...], ...}``."""
    return {slot: reg.names() for slot, reg in ALL.items()}

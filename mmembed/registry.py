"""Registries of components under stable names (timm's ``register_model`` idea).

Recipes and saved model configs name components (``connector: {type: mlp}``), never import
paths, so saved models outlive refactors. Each registry knows which constructor arguments
are *injected* by the model builder (dimensions, the tokenizer, ...) and which come from the
config, so a recipe can be validated against the constructor signature before anything heavy
is built (torchtune's ``config.validate`` idea).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["Registry", "VISION", "CONNECTORS", "REDUCERS", "BACKBONES", "POOLERS", "FUSIONS", "LOSSES", "ALL"]


class Registry:
    """A name -> builder table for one component family.

    Args:
        family: human name of the family, used in error messages ("connector").
        injected: constructor arguments the model builder passes itself; a recipe may not set them.
    """

    def __init__(self, family: str, injected: tuple[str, ...] = ()) -> None:
        self.family = family
        self.injected = frozenset(injected)
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``obj`` under ``name``; a name can be registered once."""

        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.family} '{name}' is already registered by {self._entries[name]!r}")
            self._entries[name] = obj
            obj.registry_name = name  # type: ignore[attr-defined]
            return obj

        return deco

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        _load_builtins()
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        """Return the builder registered as ``name``; a KeyError suggests the closest names."""
        _load_builtins()
        if name not in self._entries:
            raise KeyError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self._entries, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.family} '{name}'.{hint} Allowed: {', '.join(sorted(self._entries))}"

    def config_params(self, name: str) -> dict[str, inspect.Parameter]:
        """Constructor parameters a config may set for ``name`` (injected ones removed)."""
        sig = inspect.signature(self.get(name))
        return {
            k: p
            for k, p in sig.parameters.items()
            if k not in self.injected and k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def check_args(self, name: str, args: dict[str, Any]) -> list[str]:
        """Problems with ``args`` for ``name``: unknown arguments (with suggestions) and missing required ones."""
        params = self.config_params(name)
        problems = []
        for key in args:
            if key not in params:
                close = difflib.get_close_matches(key, params, n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                allowed = ", ".join(params) or "none"
                problems.append(f"'{key}' is not an argument of {self.family} '{name}'{hint}; allowed: {allowed}")
        for key, p in params.items():
            if p.default is inspect.Parameter.empty and key not in args:
                problems.append(f"{self.family} '{name}' needs argument '{key}'")
        return problems


VISION = Registry("vision encoder")
CONNECTORS = Registry("connector", injected=("in_dim", "out_dim"))
REDUCERS = Registry("token reducer", injected=("dim", "num_layers"))
BACKBONES = Registry("backbone")
POOLERS = Registry("pooler", injected=("dim", "num_layers"))
FUSIONS = Registry("fusion", injected=("dim", "vision_dim"))
LOSSES = Registry("loss")

ALL: dict[str, Registry] = {
    "vision": VISION,
    "connector": CONNECTORS,
    "reducer": REDUCERS,
    "backbone": BACKBONES,
    "pooler": POOLERS,
    "fusion": FUSIONS,
    "loss": LOSSES,
}

_loaded = False


def _load_builtins() -> None:
    """Import the built-in component modules once so their decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import mmembed.backbones  # noqa: F401
    import mmembed.connectors  # noqa: F401
    import mmembed.encoders  # noqa: F401
    import mmembed.losses  # noqa: F401
    import mmembed.pooling  # noqa: F401
    import mmembed.tokens  # noqa: F401

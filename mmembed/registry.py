"""Registries of components under stable names (timm's ``register_model`` idea).

Recipes and saved model configs name components (``connector: {type: mlp}``), never import
paths, so saved models outlive refactors. Each registry knows which constructor arguments
are *injected* by the model builder (dimensions, the tokenizer, ...) and which come from the
config, so a recipe can be validated against the constructor signature before anything heavy
is built (torchtune's ``config.validate`` idea).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)

#: Python entry-point group of third-party components: ``[project.entry-points."mmembed.components"]`` with
#: ``name = "my_pkg.my_module"``; the module registers its components when imported, like the built-ins.
ENTRY_POINT_GROUP = "mmembed.components"

__all__ = [
    "Registry",
    "instantiate",
    "slot_args",
    "load_plugins",
    "component_module",
    "import_module",
    "ENTRY_POINT_GROUP",
    "VISION",
    "CONNECTORS",
    "MERGERS",
    "PRUNERS",
    "BACKBONES",
    "POOLERS",
    "FUSIONS",
    "LOSSES",
    "ALL",
]


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
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            load_plugins()
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        """Return the builder registered as ``name``; a KeyError suggests the closest names."""
        if name not in self._entries:
            load_plugins()
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
MERGERS = Registry("token merger")
PRUNERS = Registry("token pruner", injected=("num_layers",))
BACKBONES = Registry("backbone")
POOLERS = Registry("pooler", injected=("dim", "num_layers"))
FUSIONS = Registry("fusion", injected=("dim", "vision_dim"))
LOSSES = Registry("loss")

#: model slot (or ``loss``) -> its registry. The built-in components register themselves when their modules are
#: imported, which ``import mmembed`` does (timm's layout: the registry imports none of them, so no import circle).
ALL: dict[str, Registry] = {
    "vision": VISION,
    "connector": CONNECTORS,
    "merge": MERGERS,
    "prune": PRUNERS,
    "backbone": BACKBONES,
    "pooler": POOLERS,
    "fusion": FUSIONS,
    "loss": LOSSES,
}


_plugins_loaded = False


def load_plugins() -> None:
    """Import every module named in the ``mmembed.components`` entry points, once (lazily: on the first lookup of a
    name the built-ins do not have). A plugin that fails to import is logged, not fatal: a recipe naming one of its
    components then gets the usual "unknown component" error."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the built-ins
            log.warning("mmembed plugin %r (%s) failed to import: %s", ep.name, ep.value, e)


def component_module(obj: Any) -> str | None:
    """The module that defines ``obj``'s class when it is not part of mmembed (what a saved model must import)."""
    module = type(obj).__module__
    return None if module.split(".")[0] == "mmembed" else module


def import_module(name: str, key: str) -> None:
    """Import a user's component module named by ``key``; the error says which module and what failed."""
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - reported with the key that named it
        raise ImportError(f"{key}: cannot import {name!r}: {type(e).__name__}: {e}") from e


def slot_args(node: dict[str, Any] | None) -> dict[str, Any]:
    """A slot's constructor arguments: the mapping without its ``type``."""
    return {} if node is None else {k: v for k, v in node.items() if k != "type"}


def instantiate(registry: Registry, spec: dict[str, Any], **injected: Any) -> Any:
    """Build the component ``spec['type']`` with its config args plus the injected ones it accepts.

    The built object remembers ``init_args`` (what the config set) and ``registry_name``, which saving writes back.
    """
    cls = registry.get(spec["type"])
    params = inspect.signature(cls).parameters
    args = slot_args(spec)
    obj = cls(**{k: v for k, v in injected.items() if k in params}, **args)
    obj.init_args = dict(args)
    obj.registry_name = spec["type"]
    return obj

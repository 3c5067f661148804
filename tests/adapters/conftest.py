"""Fixtures of the adapter tests: the tiny model with distinct query and document prompts, and its directory."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

PROMPTS = {"query": "Find the matching item.", "document": "Represent the item."}
TOL = 1e-6


@pytest.fixture
def model(_tiny_model):
    """A fresh copy of the tiny model whose query and document prompts differ (so the role shows)."""
    m = copy.deepcopy(_tiny_model)
    m.cfg.prompts = dict(PROMPTS)
    return m


@pytest.fixture(scope="session")
def model_dir(_tiny_model, tmp_path_factory) -> Path:
    """The tiny model (with :data:`PROMPTS`) saved as a model directory."""
    m = copy.deepcopy(_tiny_model)
    m.cfg.prompts = dict(PROMPTS)
    return m.save(tmp_path_factory.mktemp("adapters") / "tiny-mm")


def assert_close(actual, expected, tol: float = TOL) -> None:
    """Same shape and every value within ``tol`` (float32 values round-tripped through Python floats)."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    assert np.abs(a - e).max(initial=0.0) <= tol

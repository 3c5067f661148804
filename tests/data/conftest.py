"""Fixtures for the data tests (helpers live in data_helpers.py)."""

from __future__ import annotations

import pytest

from tests.data.data_helpers import FakeProcessor


@pytest.fixture
def processor() -> FakeProcessor:
    return FakeProcessor()

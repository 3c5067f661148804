"""Fixtures of the eval tests: the tiny model saved once, and a small hand-made eval folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.helpers import known_set, t2i_set


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory: pytest.TempPathFactory, _tiny_model) -> tuple[Path, Path]:
    """(model dir, data dir): N24News (6 queries, 4 shared text labels), MSCOCO_t2i (6 captions vs 3 images)."""
    root = tmp_path_factory.mktemp("evalcli")
    _tiny_model.save(root / "model")
    known_set(root / "data", n=6, k=4, name="N24News")
    t2i_set(root / "data", n=6, k=3, name="MSCOCO_t2i")
    (root / "data" / "img" / "c5.png").unlink()  # rows of MSCOCO_t2i that show image c5 are misses
    return root / "model", root / "data"

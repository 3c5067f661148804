"""Model directories written by older mmembed load and encode exactly as they did (tests/fixtures/v1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mmembed

FIXTURES = Path(__file__).parent / "fixtures" / "v1"


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_a_format_1_directory_encodes_identically(name):
    folder = FIXTURES / name
    spec = json.loads((folder / "inputs.json").read_text())
    meta = json.loads((folder / "model" / "mmembed_config.json").read_text())
    assert meta["format_version"] == 1 and "reducer" in meta["model"]  # written by the old code, never rewritten
    model = mmembed.load(folder / "model")
    images = [None if im is None else [str(folder / p) for p in im] for im in spec["images"]]
    emb = model.encode(texts=spec["texts"], images=images, instruction=spec["instruction"])
    # the same computation, up to float rounding that varies with the CPU's kernels (about 3e-7 seen between two
    # machines); any change of behaviour (a different kept-token count, layout or position) moves it by 1e-3 or more
    np.testing.assert_allclose(emb, np.load(folder / "expected.npy"), rtol=0, atol=1e-5)

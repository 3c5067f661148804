"""Pool-adapter (InfMLLM): raster order kept, exact/adaptive modes, token count reaches the processor."""

from __future__ import annotations

import pytest
import torch

from mmembed.config import ConfigError
from mmembed.connectors.pool_adapter import PoolAdapter, pool_grid
from tests.tiny_models import build, rows


def test_gradient_image_pools_to_a_monotone_grid_in_raster_order():
    h = w = 8
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    value = (10 * yy + xx).float()  # increases along rows and columns
    tokens = value.reshape(1, h * w, 1)
    for mode, p in [("exact", 4), ("exact", 2), ("adaptive", 3)]:
        pooled = pool_grid(tokens, (h, w), p, mode).reshape(p, p)
        assert (pooled[:, 1:] > pooled[:, :-1]).all(), (mode, p)  # left -> right
        assert (pooled[1:, :] > pooled[:-1, :]).all(), (mode, p)  # top -> bottom
    exact = pool_grid(tokens, (h, w), 4, "exact").reshape(4, 4)
    assert exact[0, 0] == value[:2, :2].mean() and exact[3, 2] == value[6:, 4:6].mean()


def test_connector_output_count_and_mlp():
    conn = PoolAdapter(in_dim=6, out_dim=10, pool_size=2)
    out = conn(torch.randn(3, 16, 6), (4, 4))
    assert out.shape == (3, 4, 10) and conn.num_tokens((4, 4)) == 4


def test_exact_mode_rejects_a_non_divisor_naming_the_key():
    conn = PoolAdapter(in_dim=6, out_dim=10, pool_size=3, mode="exact")
    with pytest.raises(ConfigError) as e:
        conn.num_tokens((4, 4))
    assert e.value.key == "model.connector.pool_size" and "adaptive" in e.value.message
    assert PoolAdapter(in_dim=6, out_dim=10, pool_size=3, mode="adaptive").num_tokens((4, 4)) == 9


def test_build_fails_naming_the_key_and_validation_checks_mode():
    with pytest.raises(ConfigError, match="model.connector.pool_size"):
        build("model.connector={type: pool_adapter, pool_size: 3}")
    with pytest.raises(ConfigError, match="model.connector.mode"):
        build("model.connector={type: pool_adapter, pool_size: 2, mode: bogus}")


def test_processor_expands_placeholders_to_p_squared_and_model_encodes():
    model = build("model.connector={type: pool_adapter, pool_size: 2}")
    assert model.processor.image_tokens == 4
    texts, images, instr = rows()
    a = model.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    b = model.encode(texts=texts, images=images, instruction=instr, batch_size=1)
    assert abs(a - b).max() <= 1e-5 and abs(a[1] - a[2]).max() > 1e-4

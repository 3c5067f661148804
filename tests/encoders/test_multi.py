"""SPHINX multi-encoder mixing: aligned grids, channel concatenation, per-encoder normalization, bad combos."""

from __future__ import annotations

import pytest
import torch

from mmembed.config import ConfigError, load_recipe
from mmembed.encoders.multi import MultiEncoder, resample_grid
from tests.conftest import TINY_RECIPE
from tests.tiny_models import build, rows

SPECS = [
    {"type": "timm", "name": "test_vit", "image_size": 64},
    {"type": "timm", "name": "test_resnet", "image_size": 64, "layer": -1},
]


def test_grids_aligned_and_channels_concatenated():
    torch.manual_seed(0)
    enc = MultiEncoder(SPECS).eval()
    a, b = enc.encoders
    assert enc.out_dim == a.out_dim + b.out_dim and enc.image_size == 64 and a.grid() != b.grid()
    target = min([a.grid(), b.grid()], key=lambda g: g[0] * g[1])
    assert enc.grid() == target
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, target[0] * target[1], enc.out_dim)
        xa = (x - torch.tensor(a.transform.mean).view(1, 3, 1, 1)) / torch.tensor(a.transform.std).view(1, 3, 1, 1)
        ref = resample_grid(a(xa), a.grid(), target)
        assert torch.allclose(out[..., : a.out_dim], ref, atol=1e-5)
    assert enc.global_feature(x).shape == (2, a.out_dim + b.out_dim)


def test_resample_pools_down_and_interpolates_up():
    t = torch.arange(16.0).reshape(1, 16, 1)
    assert resample_grid(t, (4, 4), (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert resample_grid(t, (4, 4), (8, 8)).shape == (1, 64, 1)


@pytest.mark.parametrize(
    "encoders",
    [
        "[{type: timm, name: test_vit}]",
        "[{type: timm, name: test_vit}, {type: multi, encoders: []}]",
        "[{type: timm, name: test_vit}, {type: timm, nme: test_vit}]",
    ],
)
def test_bad_combinations_fail_validation_naming_the_key(encoders):
    with pytest.raises(ConfigError) as e:
        load_recipe(TINY_RECIPE, [f"model.vision={{type: multi, encoders: {encoders}}}"])
    assert e.value.key == "model.vision.encoders"


def test_model_with_two_encoders_encodes_saves_and_loads(tmp_path):
    import mmembed

    model = build(
        "model.vision={type: multi, encoders: [{type: timm, name: test_vit, image_size: 64}, "
        "{type: timm, name: test_resnet, image_size: 48}]}"
    )
    texts, images, instr = rows()
    a = model.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a - model.encode(texts=texts, images=images, instruction=instr, batch_size=1)).max() <= 1e-5
    model.save(tmp_path / "m")
    b = mmembed.load(tmp_path / "m").encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a - b).max() <= 1e-6

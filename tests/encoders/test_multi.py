"""SPHINX multi-encoder mixing: the common grid (SPHINX's finest grid by default, the old coarsest one on request),
upsampling as SPHINX does it, channel concatenation, per-encoder normalization, bad combos, old saved models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmembed.config import ConfigError, load_recipe
from mmembed.encoders.multi import MultiEncoder, resample_grid
from mmembed.io import pin_legacy_args
from tests.conftest import TINY_RECIPE
from tests.tiny_models import build, rows

SPECS = [
    {"type": "timm", "name": "test_vit", "image_size": 64},  # 4x4 grid
    {"type": "timm", "name": "test_resnet", "image_size": 64, "layer": -1},  # 2x2 grid
]


def sphinx_upsample(feature_map: torch.Tensor, factor: int) -> torch.Tensor:
    """Port of LLaMA2-Accessory ``accessory/model/LLM/llama_ens.py`` ``encode_image``: the ConvNeXt map
    (B, C, h, w) is repeat-interleaved on the last axis, then the one before, and flattened to (B, h*w*f*f, C)."""
    x = feature_map.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    return x.flatten(-2).permute(0, 2, 1)


def old_resample(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """mmembed's resampling before issue #13: adaptive average pooling down, bilinear up."""
    if tuple(grid) == tuple(target):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    if target[0] <= grid[0] and target[1] <= grid[1]:
        x = F.adaptive_avg_pool2d(x, target)
    else:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def normalized(enc: MultiEncoder, i: int, x: torch.Tensor) -> torch.Tensor:
    e = enc.encoders[i]
    return (x - torch.tensor(e.transform.mean).view(1, 3, 1, 1)) / torch.tensor(e.transform.std).view(1, 3, 1, 1)


def test_default_grid_is_the_finest_encoder_grid_and_channels_are_concatenated():
    torch.manual_seed(0)
    enc = MultiEncoder(SPECS).eval()
    a, b = enc.encoders
    assert a.grid() == (4, 4) and b.grid() == (2, 2)
    assert enc.grid() == (4, 4) and enc.out_dim == a.out_dim + b.out_dim and enc.image_size == 64
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, 16, enc.out_dim)
        assert torch.equal(out[..., : a.out_dim], a(normalized(enc, 0, x)))  # the finest grid passes unchanged
    assert enc.global_feature(x).shape == (2, a.out_dim + b.out_dim)


def test_coarse_grid_is_upsampled_exactly_as_sphinx_does():
    torch.manual_seed(0)
    fmap = torch.randn(3, 5, 8, 8)  # SPHINX's ConvNeXt map is 8x8, its CLIP grid 16x16
    tokens = fmap.flatten(2).transpose(1, 2)
    assert torch.equal(resample_grid(tokens, (8, 8), (16, 16)), sphinx_upsample(fmap, 2))
    assert torch.equal(resample_grid(tokens, (8, 8), (24, 24), "nearest"), sphinx_upsample(fmap, 3))
    enc = MultiEncoder(SPECS).eval()
    b = enc.encoders[1]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        coarse = b(normalized(enc, 1, x))  # (2, 4, D) on 2x2
        fmap_b = coarse.transpose(1, 2).reshape(2, b.out_dim, 2, 2)
        assert torch.equal(enc(x)[..., enc.encoders[0].out_dim :], sphinx_upsample(fmap_b, 2))


def test_a_non_integer_upsampling_factor_replicates_tokens():
    t = torch.arange(4.0).reshape(1, 4, 1)  # 2x2 -> 3x3: no reference case; nearest keeps values, never mixes
    out = resample_grid(t, (2, 2), (3, 3))
    assert out.flatten().tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.0]
    bilinear = resample_grid(t, (2, 2), (3, 3), "bilinear")
    assert not torch.equal(out, bilinear) and bilinear.flatten()[4].item() == 1.5


def test_resample_pools_down():
    t = torch.arange(16.0).reshape(1, 16, 1)
    assert resample_grid(t, (4, 4), (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


@pytest.mark.parametrize(
    "args",
    [{"grid": "min"}, {"grid": [2, 2], "upsample": "bilinear"}, {"grid": 4, "upsample": "bilinear"}],
)
def test_old_settings_reproduce_the_previous_output(args):
    torch.manual_seed(0)
    enc = MultiEncoder(SPECS, **args).eval()
    target = (4, 4) if args["grid"] == 4 else (2, 2)
    assert enc.grid() == target
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        old = torch.cat(
            [old_resample(e(normalized(enc, i, x)), e.grid(), target) for i, e in enumerate(enc.encoders)], dim=-1
        )
        assert torch.equal(enc(x), old)


def test_grid_forms_and_their_export():
    assert MultiEncoder(SPECS, grid=3).grid() == (3, 3)
    assert MultiEncoder(SPECS, grid=[4, 2]).grid() == (4, 2)
    assert MultiEncoder(SPECS, grid=None).grid() == (4, 4)
    args = MultiEncoder(SPECS, grid="min").export_args()
    assert args["grid"] == [2, 2] and args["upsample"] == "nearest"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("grid: mean", "model.vision.grid"),
        ("grid: 0", "model.vision.grid"),
        ("grid: [4]", "model.vision.grid"),
        ("grid: true", "model.vision.grid"),
        ("upsample: bicubic", "model.vision.upsample"),
    ],
)
def test_bad_grid_or_upsample_fails_validation_naming_the_key(override, key):
    enc = "[{type: timm, name: test_vit}, {type: timm, name: test_resnet}]"
    with pytest.raises(ConfigError) as e:
        load_recipe(TINY_RECIPE, [f"model.vision={{type: multi, encoders: {enc}, {override}}}"])
    assert e.value.key == key and "allowed" in e.value.message


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


def test_a_model_saved_before_upsample_existed_loads_with_bilinear(tmp_path):
    """A directory written before ``upsample`` (its multi slot has ``grid: [h, w]`` only) keeps bilinear upsampling;
    a recipe without ``upsample`` gets SPHINX's nearest replication."""
    import mmembed

    spec = (
        "model.vision={type: multi, grid: [4, 4], upsample: bilinear, encoders: "
        "[{type: timm, name: test_vit, image_size: 64}, {type: timm, name: test_resnet, image_size: 64}]}"
    )
    model = build(spec)
    texts, images, instr = rows()
    old = model.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    model.save(tmp_path / "m")
    cfg_path = tmp_path / "m" / "mmembed_config.json"
    meta = json.loads(cfg_path.read_text())
    assert meta["model"]["vision"]["upsample"] == "bilinear"
    del meta["model"]["vision"]["upsample"]  # what the previous export_args wrote
    cfg_path.write_text(json.dumps(meta))
    loaded = mmembed.load(tmp_path / "m")
    assert loaded.vision.upsample == "bilinear"
    np.testing.assert_allclose(
        loaded.encode(texts=texts, images=images, instruction=instr, batch_size=5), old, atol=1e-6
    )
    loaded.vision.upsample = "nearest"  # the new default would have changed the saved model's numbers
    new = loaded.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert np.abs(new - old).max() > 1e-4
    assert build(spec.replace("upsample: bilinear, ", "")).vision.upsample == "nearest"  # recipes are not pinned


def test_pin_legacy_args_fills_only_missing_arguments():
    saved = {"vision": {"type": "multi", "encoders": SPECS, "grid": [4, 4]}, "backbone": {"type": "hf_causal_lm"}}
    assert pin_legacy_args(saved)["vision"]["upsample"] == "bilinear"
    assert "upsample" not in saved["vision"]  # a copy
    explicit = {**saved, "vision": {**saved["vision"], "upsample": "nearest"}}
    assert pin_legacy_args(explicit)["vision"]["upsample"] == "nearest"
    assert pin_legacy_args({"vision": None, "connector": {"type": "mlp"}}) == {
        "vision": None,
        "connector": {"type": "mlp"},
    }

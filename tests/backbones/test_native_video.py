"""Video rows through the native backbones' own HF video paths (issue #14; docs/video.md, "Native models").

For tiny random-init Qwen2-VL, Qwen3-VL and LLaVA-OneVision checkpoints (tests/native_vlms.py) loaded by
``backbone.name=<dir>`` with a ``video:`` section, the reference is transformers itself: the model's HF processor
called on the texts written out by hand and the frames :func:`mmembed.video.load_video` sampled (passed with
``do_sample_frames=False``, so sampling is mmembed's), then ``Model.model(**inputs).last_hidden_state`` at the last
real token (its own ``pixel_values_videos`` / ``video_grid_thw`` path and, for Qwen, its own M-RoPE positions from
``get_rope_index``). Videos are a list of PIL frames and an mpeg4 file written here with PyAV.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mmembed
from mmembed.config import ConfigError
from mmembed.types import InputError, Side
from mmembed.video import VideoOptions, load_video
from tests.conftest import make_image
from tests.native_vlms import gradcache_and_plain

av = pytest.importorskip("av")

VID = "<|video_1|>"
FAMILIES = ("qwen2_vl", "qwen3_vl", "llava_onevision")
#: visual unit (patch * merge) of each tiny model; LLaVA-OneVision's video processor resizes to its 32 px tower
UNIT = {"qwen2_vl": 28, "qwen3_vl": 32, "llava_onevision": 32}
IMAGE_TEXT = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava_onevision": "<image>",
}
VIDEO_TEXT = {
    "qwen2_vl": "<|vision_start|><|video_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|video_pad|><|vision_end|>",
    "llava_onevision": "<video>",
}


def _frames(seed: int, n: int, h: int, w: int) -> list[Image.Image]:
    """n RGB frames (h, w): noise with a bright square moving right, one colour per frame."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        a[h // 4 : h // 2, 2 * i : 2 * i + w // 4] = (250, 40 * i % 256, 20)
        out.append(Image.fromarray(a))
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An 8-frame, 4 fps, 72x56 mpeg4 file written with PyAV."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 72, 56, "yuv420p"
        for f in _frames(7, 8, 56, 72):
            c.mux(s.encode(av.VideoFrame.from_image(f)))
        c.mux(s.encode())
    return str(path)


def _video_cfg(family: str) -> dict:
    u = UNIT[family]
    return {"max_frames": 4, "min_pixels": u * u, "max_pixels": u * u * 4}


def _build(path, family, side="left", normalize=False, video=None):
    backbone = {"type": family, "name": str(path), "video": _video_cfg(family) if video is None else video}
    model = {"backbone": backbone, "pooler": {"type": "last_token"}, "normalize": normalize, "padding_side": side}
    torch.manual_seed(0)
    return mmembed.build_model({"model": model}).eval()


def _rows(clip: str):
    """(sides, the HF processor's text per row as family -> list, the images, the videos in order)."""
    frames_a, frames_b = _frames(1, 6, 60, 90), _frames(2, 5, 64, 64)
    img = make_image(3, size=(64, 48))
    sides = [
        Side(videos=[frames_a]),  # video only (frames)
        Side(instruction="Represent the video.", text=f"{VID} what happens?", videos=[clip]),  # video + text
        Side(text="a picture of", images=[img]),  # an image row in the same batch
        Side(text=f"before {VID} after", videos=[frames_b]),  # an inline video
    ]

    def texts(family: str) -> list[str]:
        v, i = VIDEO_TEXT[family], IMAGE_TEXT[family]
        return [
            f"{v}</s>",
            f"{v}Represent the video. what happens?</s>",
            f"{i}a picture of</s>",
            f"before {v} after</s>",
        ]

    return sides, texts, [img], [frames_a, clip, frames_b]


def _last(hidden, mask):
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # last real column, either padding side
    return hidden[torch.arange(hidden.shape[0]), last]


def _reference(hf, proc, family, texts, images, videos, options, side):
    """transformers' own processor on mmembed's sampled frames, then its own forward."""
    decoded = [load_video(v, options, output="numpy") for v in videos]
    kw = {"do_sample_frames": False}
    kw["video_metadata"] = [
        {"total_num_frames": v.total_frames, "fps": v.source_fps, "frames_indices": v.indices.tolist()} for v in decoded
    ]
    if family.startswith("qwen"):
        kw.update(do_resize=False, cap_pixels_per_frame=False)  # frames already resized by mmembed's budget
    inputs = proc(
        text=texts,
        images=images or None,
        videos=[v.frames for v in decoded],
        padding=True,
        padding_side=side,
        return_tensors="pt",
        videos_kwargs=kw,
    )
    with torch.no_grad():
        hidden = hf.model(**inputs).last_hidden_state
    return inputs, _last(hidden, inputs["attention_mask"])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_video_embedding_equals_the_hf_models_last_token_state(family, side, clip, hf_checkpoint):
    path, hf, proc = hf_checkpoint(family)
    model = _build(path, family, side)
    options = model.processor.video_options
    assert options.factor == (UNIT[family] if family.startswith("qwen") else 28)
    sides, texts, images, videos = _rows(clip)
    for picked in ([0, 1], [0, 1, 2, 3]):  # video-only rows; a batch mixing image, video and inline video rows
        rows = [sides[i] for i in picked]
        imgs, vids = (images, videos) if 2 in picked else ([], videos[:2])
        inputs, ref = _reference(hf, proc, family, [texts(family)[i] for i in picked], imgs, vids, options, side)
        batch = model.processor(rows)
        assert torch.equal(batch["input_ids"], inputs["input_ids"]), "processor output differs from the HF processor's"
        assert torch.equal(batch["attention_mask"], inputs["attention_mask"].long())
        assert torch.equal(batch["pixel_values_videos"], inputs["pixel_values_videos"])
        assert batch["video_counts"].tolist() == [len(s.videos) for s in rows]
        with torch.no_grad():
            emb = model(batch)
        assert float((emb - ref).abs().max()) == 0.0  # the HF forward itself, on the same inputs
        assert float(torch.cdist(ref, ref).fill_diagonal_(1.0).min()) > 1e-3, "the rows must differ"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_video_positions_are_hf_rope_index_and_the_instruction_is_not_pooled(family, clip, hf_checkpoint):
    path, hf, _ = hf_checkpoint(family)
    model = _build(path, family)
    sides = _rows(clip)[0]
    batch = model.processor(sides)
    base = model.backbone.base_model()
    pos, _ = base.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert (batch["mm_token_type_ids"] == 2).any() and pos.shape == (3, *batch["input_ids"].shape)
    assert not torch.equal(pos[0], pos[1]), "video tokens take 3-D positions"
    # row 1 is <video> instruction text: the pool mask drops exactly the instruction's tokens after the video block
    tok = model.processor.tokenizer
    n_instr = len(tok("Represent the video.", add_special_tokens=False)["input_ids"])
    ids, mask, pool = batch["input_ids"][1], batch["attention_mask"][1], batch["pool_mask"][1]
    end = int((ids == 402).nonzero().max()) + 1  # after the leading video's last <|vision_end|>
    dropped = ((mask == 1) & (pool == 0)).nonzero().flatten().tolist()
    assert dropped == list(range(end, end + n_instr))
    if family == "qwen3_vl":  # each frame pair's mean time: indices [0, 2 | 4, 6] of the 4 fps file -> 0.25, 1.25 s
        text = tok.decode(ids[mask.bool()])
        assert (
            text.startswith("<0.2 seconds><|vision_start|>") and "<|vision_end|><1.2 seconds><|vision_start|>" in text
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_split_of_a_video_batch_embeds_like_the_whole_batch(family, clip, hf_checkpoint):
    path, _, _ = hf_checkpoint(family)
    model = _build(path, family)
    sides = _rows(clip)[0]
    batch = model.processor(sides)
    chunks = model.processor.split(batch, 1)
    assert len(chunks) == 4
    vids = [c["pixel_values_videos"] for c in chunks if "pixel_values_videos" in c]
    assert len(vids) == 3 and torch.equal(torch.cat(vids), batch["pixel_values_videos"])
    if family.startswith("qwen"):
        grids = [c["video_grid_thw"] for c in chunks if "video_grid_thw" in c]
        assert torch.equal(torch.cat(grids), batch["video_grid_thw"])
        assert all(
            c["pixel_values_videos"].shape[0] == int(c["video_grid_thw"].prod(-1).sum())
            for c in chunks
            if "video_grid_thw" in c
        )
    with torch.no_grad():
        full = model(batch)
        parts = torch.cat([model(c) for c in chunks])
        pairs = torch.cat([model(c) for c in model.processor.split(batch, 2)])
    d1, d2 = float((full - parts).abs().max()), float((full - pairs).abs().max())
    print(f"{family}: split into 1 / 2 rows vs the whole batch: {d1:.2g} / {d2:.2g}")
    assert float((full - parts).abs().max()) <= 1e-5
    assert float((full - pairs).abs().max()) <= 1e-5


@pytest.mark.parametrize("family", ["qwen3_vl", "llava_onevision"])
def test_gradcache_with_a_video_batch_equals_the_plain_step(family, clip, hf_checkpoint):
    path, _, _ = hf_checkpoint(family)
    model = _build(path, family, normalize=True).train()
    sides = _rows(clip)[0]
    queries = [sides[0], sides[1], sides[3], Side(text="a red circle")]
    targets = [
        Side(text="noise"),
        Side(text="a clip"),
        sides[2],
        Side(text="blue square", videos=[_frames(9, 4, 64, 64)]),
    ]
    res, plain, grads, ref_grads = gradcache_and_plain(model, model.processor(queries), model.processor(targets))
    assert res.num_chunks == 4
    assert abs(float(res.loss) - plain.item()) <= 1e-5
    assert grads.keys() == ref_grads.keys()
    tower = "visual." if family == "qwen3_vl" else "vision_tower."
    assert any(tower in n and float(g.abs().max()) > 0 for n, g in ref_grads.items()), "the video reaches the tower"
    # the ViT's key bias has no gradient (softmax ignores a shift shared by all keys; no RoPE there): both steps give
    # rounding noise of ~1e-8 there
    noise = {n for n in grads if "vision_tower" in n and n.endswith("k_proj.bias")}
    assert all(float(grads[n].abs().max()) < 1e-6 and float(ref_grads[n].abs().max()) < 1e-6 for n in noise)
    # relative to each tensor's largest gradient (tests/train/test_gradcache.py): chunks are padded differently
    rel = max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()) for n in grads if n not in noise)
    dl = abs(float(res.loss) - plain.item())
    print(f"{family}: GradCache vs plain on a video batch: loss diff {dl:.2g}, gradients rel {rel:.2g}")
    assert rel <= 1e-5


def test_bad_videos_name_the_row_and_the_file(clip, hf_checkpoint, tmp_path):
    path, _, _ = hf_checkpoint("qwen2_vl")
    model = _build(path, "qwen2_vl")
    missing = str(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    good = Side(text="ok", videos=[clip])
    with pytest.raises(InputError, match=r"row 7: video .*missing\.mp4: file not found \[video_missing\]"):
        model.processor([good, Side(videos=[missing])], rows=[3, 7])
    with pytest.raises(InputError, match=r"row 1: video .*junk\.mp4: .*\[video_corrupt\]"):
        model.encode(texts=["a", "b"], videos=[clip, str(tmp_path / "junk.mp4")])
    with pytest.raises(InputError, match=r"row 0: the text has 2 video placeholder\(s\) .* but 1 video\(s\)"):
        model.processor([Side(text=f"x {VID} {VID}", videos=[clip])])


def test_recipe_options_are_validated_and_encode_overrides_them(clip, hf_checkpoint, tmp_path):
    path, _, _ = hf_checkpoint("qwen2_vl")
    with pytest.raises(ConfigError, match="fpss") as e:
        _build(path, "qwen2_vl", video={"fpss": 2})
    assert e.value.key == "model.backbone.video"
    model = _build(path, "qwen2_vl", normalize=True)
    assert model.processor.video_options.max_frames == 4
    kw = {"texts": [None, "a clip"], "videos": [np.stack([np.asarray(f) for f in _frames(1, 6, 60, 90)]), clip]}
    four = model.encode(**kw)
    two = model.encode(**kw, video_options={"max_frames": 2})
    assert np.abs(four - two).max() > 1e-3, "the per-call option must change the sampling"
    sides = [Side(videos=[_frames(1, 6, 60, 90)]), Side(text="a clip", videos=[clip])]
    with torch.no_grad():
        again = model(
            model.processor(
                sides,
                video_options=VideoOptions(max_frames=2, frame_multiple=2, max_pixels=28 * 28 * 4, min_pixels=28 * 28),
            )
        )
    assert np.abs(again.numpy() - two).max() <= 1e-5
    with pytest.raises(ValueError, match="fpss"):
        model.encode(**kw, video_options={"fpss": 1})
    loaded = mmembed.load(model.save(tmp_path / "m"))  # the recipe's video options travel with the model
    assert loaded.processor.video_options == model.processor.video_options
    np.testing.assert_array_equal(loaded.encode(**kw), four)

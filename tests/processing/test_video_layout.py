"""Rows with videos: where each video goes in the text (``layout_side`` / ``media_layout``), the HF text the native
processor writes for them, and the refusals (a model without a video path, placeholders that do not match)."""

from __future__ import annotations

import pytest

import mmembed
from mmembed.processing.native import resolve_video_options
from mmembed.types import VIDEO_PLACEHOLDER as VID
from mmembed.types import InputError, Side, item_kinds, layout_side
from mmembed.video import VideoOptions
from tests.native_vlms import ROOT


@pytest.fixture(scope="module")
def qwen():
    return mmembed.build_model(ROOT / "recipes/tiny/qwen2vl.yaml").eval().processor


def test_layout_places_videos_like_images():
    f = ["frame"]
    assert layout_side(Side(text="hi", videos=[f]), 0, "<image>", 8) == (1, "", "hi")
    assert layout_side(Side(text="hi", images=["a"], videos=[f]), 0, "<image>", 8) == (2, "", "hi")
    lead, instr, rest = layout_side(Side(instruction=" Do. ", text=f"x {VID} y", videos=[f]), 0, "<image>", 8)
    assert (lead, instr, rest) == (0, "Do.", f"x {VID} y")
    assert item_kinds(f"<image> a {VID} b <image>", "<image>") == (["image", "video", "image"], ["", " a ", " b ", ""])
    # a video marker without videos stays text (image-only data keeps its meaning)
    assert layout_side(Side(text=f"see {VID}"), 0, "<image>", 8) == (0, "", f"see {VID}")
    with pytest.raises(InputError, match=r"row 4: the text has 1 video placeholder\(s\) .* but 2 video\(s\)"):
        layout_side(Side(text=f"{VID} x", videos=[f, f]), 4, "<image>", 8)
    with pytest.raises(InputError, match="row 2: 3 videos, more than 2"):
        layout_side(Side(videos=[f, f, f]), 2, "<image>", 2)
    assert not Side(videos=[f]).is_empty()


def test_native_text_and_kinds(qwen):
    v, i = qwen.video_text, qwen.image_text
    side = Side(instruction="Find it.", text=f"a {VID} b <image> c", images=["img"], videos=[["f"]])
    assert qwen.media_layout(side, 0)[3] == ["video", "image"]
    assert qwen.text(side, 0) == f"Find it. a {v} b {i} c</s>"
    assert qwen.text(Side(text="q", images=["img"], videos=[["f"]]), 0) == f"{i}{v}q</s>"
    with pytest.raises(InputError, match="own video text"):
        qwen.text(Side(text=f"x {v}", videos=[["f"]]), 0)


def test_models_without_a_video_path_refuse_videos():
    model = mmembed.build_model(ROOT / "recipes/tiny/llava.yaml").eval()
    with pytest.raises(InputError, match="row 1: 1 video.* takes no video input"):
        model.processor([Side(text="a"), Side(text="b", videos=[["f"]])])
    with pytest.raises(ValueError, match="takes no video input"):
        model.encode(texts=["a"], video_options={"max_frames": 2})


def test_per_call_options_override_the_recipe_keys():
    base = VideoOptions(max_frames=4, factor=32)
    assert resolve_video_options(base, None) is base
    assert resolve_video_options(base, {"fps": 2.0}) == VideoOptions(max_frames=4, factor=32, fps=2.0)
    assert resolve_video_options(base, VideoOptions()) == VideoOptions()
    with pytest.raises(ValueError, match="maxframes"):
        resolve_video_options(base, {"maxframes": 2})

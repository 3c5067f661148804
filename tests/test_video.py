"""mmembed.video: decoding, sampling, resizing budgets and every bad-video kind, on clips written here with PyAV."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed.data.skips import VIDEO_REASONS, BadSample, SkipCounter, video_reason
from mmembed.images import load_image
from mmembed.video import (
    VIDEO_ERROR_KINDS,
    VideoError,
    VideoOptions,
    frame_size,
    load_video,
    sample_indices,
    smart_resize,
)

av = pytest.importorskip("av")

T, H, W, RATE = 20, 48, 64, 10  # 2 s at 10 fps, 64 x 48


def _frames(n: int = T) -> np.ndarray:
    """(n, H, W, 3) uint8: a distinct solid colour per frame with a white square moving left to right."""
    k = np.arange(n)
    colour = np.stack([(k * 37) % 256, (k * 91) % 256, 255 - (k * 12) % 256], axis=1).astype(np.uint8)
    f = np.broadcast_to(colour[:, None, None, :], (n, H, W, 3)).copy()
    for i in range(n):
        f[i, 10:26, 2 * i : 2 * i + 16] = 250
    return f


def _write(path: Path, frames: np.ndarray, codec: str = "ffv1", fmt: str | None = None, **opts: str) -> Path:
    pix = {"ffv1": "bgr0", "libx264rgb": "rgb24", "mpeg4": "yuv420p"}[codec]
    with av.open(str(path), mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=RATE, options=opts)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    frames = _frames()
    out = {"mkv": _write(d / "a.mkv", frames, "ffv1")}  # Matroska: no frame count in the header
    out["mp4"] = _write(d / "a.mp4", frames, "libx264rgb", crf="0")  # frame count in the header (stts)
    out["mpeg4"] = _write(d / "b.mp4", frames, "mpeg4", qscale="1")
    pngs = []
    for i, f in enumerate(frames):
        pngs.append(d / f"f{i:03d}.png")
        Image.fromarray(f).save(pngs[-1])
    out["pngs"] = d  # type: ignore[assignment]
    return out


def _pngs(clips: dict[str, Path]) -> list[Path]:
    return sorted(Path(clips["pngs"]).glob("f*.png"))


@pytest.mark.parametrize("kind", ["mkv", "mp4"])
def test_lossless_clip_equals_its_frames_as_images(clips: dict[str, Path], kind: str) -> None:
    if {"ffv1", "libx264rgb"} - set(av.codecs_available):
        pytest.skip("this PyAV wheel lacks a lossless RGB encoder")
    v = load_video(clips[kind], output="numpy")
    images = np.stack([np.asarray(load_image(p)) for p in _pngs(clips)])
    assert v.frames.dtype == np.uint8 and v.frames.shape == (T, H, W, 3)
    np.testing.assert_array_equal(v.frames, images)  # FFV1 bgr0 / x264rgb crf 0: lossless RGB
    np.testing.assert_array_equal(v.indices, np.arange(T))
    np.testing.assert_allclose(v.timestamps, np.arange(T) / RATE)
    assert v.source_fps == RATE and v.total_frames == T
    pil = load_video(clips[kind]).frames
    assert all(im.mode == "RGB" for im in pil)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), images)


def test_lossy_clip_is_close(clips: dict[str, Path]) -> None:
    # MPEG-4 part 2 stores YUV 4:2:0: chroma is halved in both directions and quantised, so the square's sharp
    # edges bleed; at qscale 1 the mean error stays small, not zero.
    v = load_video(clips["mpeg4"], output="numpy")
    err = np.abs(v.frames.astype(np.int16) - _frames().astype(np.int16))
    assert v.frames.shape == (T, H, W, 3) and err.mean() < 4.0


def test_bytes_equal_path(clips: dict[str, Path]) -> None:
    a = load_video(clips["mp4"], VideoOptions(max_frames=4), output="numpy")
    b = load_video(clips["mp4"].read_bytes(), VideoOptions(max_frames=4), output="numpy")
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.indices, b.indices)


def _formula(total: int, src: float | None, fps: float | None, mx: int | None, mn: int, m: int) -> list[int]:
    """docs/video.md's formula, written out independently of the implementation."""
    cap = total if mx is None else min(mx, total)
    cap = max(cap // m * m, m)
    n = max(total / src * fps, mn) if fps and src else total
    n = max(int(min(n, cap, total) // m) * m, m)
    return [i * total // n for i in range(n)]


@pytest.mark.parametrize("total", [1, 2, 7, 20, 33, 100, 241, 1000])
def test_sampling_formula(total: int) -> None:
    for src, fps, mx, mn, m in [(10, None, None, 1, 1), (10, 5, 6, 1, 2), (30, 2, 768, 4, 2), (25, 1, 8, 1, 2)]:
        idx = sample_indices(total, src, fps, mx, mn, m)
        assert idx.tolist() == _formula(total, src, fps, mx, mn, m)
        assert len(idx) % m == 0 and (mx is None or len(idx) <= max(mx, m))
        assert np.all(np.diff(idx) >= 0) and idx[0] == 0 and idx[-1] < total
    assert sample_indices(20, 10, 5, 6, 1, 2).tolist() == [0, 3, 6, 10, 13, 16]
    assert sample_indices(1, frame_multiple=2).tolist() == [0, 0]  # shorter than m: the frame repeats


def test_sampling_matches_qwen2vl() -> None:
    vp = pytest.importorskip("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    from transformers.video_utils import VideoMetadata

    proc = vp.Qwen2VLVideoProcessor()
    for total in (8, 20, 33, 100, 241, 1000, 4321):
        for src, fps, mx, mn in [(10.0, 5.0, 6, 1), (30.0, 2.0, 768, 4), (25.0, 1.0, 16, 4), (24.0, 8.0, 64, 2)]:
            meta = VideoMetadata(total_num_frames=total, fps=src, duration=total / src)
            ref = proc.sample_frames(meta, fps=fps, min_frames=mn, max_frames=mx, temporal_patch_size=2)
            assert sample_indices(total, src, fps, mx, mn, 2).tolist() == ref.tolist(), (total, src, fps, mx)


def test_file_sampling_by_fps_and_max_frames(clips: dict[str, Path]) -> None:
    o = VideoOptions(fps=5, max_frames=6, frame_multiple=2)
    v = load_video(clips["mkv"], o, output="numpy")
    idx = sample_indices(T, RATE, 5, 6, 1, 2)
    np.testing.assert_array_equal(v.indices, idx)
    np.testing.assert_array_equal(v.frames, _frames()[idx])
    np.testing.assert_allclose(v.timestamps, idx / RATE)


def test_smart_resize_matches_transformers() -> None:
    ip = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    for h, w in [(48, 64), (1080, 1920), (17, 3000), (500, 499), (28, 28)]:
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (28 * 28, 28 * 28 * 4)]:
            assert smart_resize(h, w, 28, lo, hi) == ip.smart_resize(h, w, 28, lo, hi)


def test_pixel_budgets(clips: dict[str, Path]) -> None:
    per = VideoOptions(max_pixels=28 * 28 * 2)
    h, w = frame_size(480, 640, 16, per)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 2
    total = VideoOptions(max_pixels=10**7, total_pixels=16 * 28 * 28 * 6)
    h, w = frame_size(480, 640, 16, total)
    assert h * w * 16 <= 16 * 28 * 28 * 6 and (h, w) == smart_resize(480, 640, 28, 28 * 28, 28 * 28 * 6)
    # a total budget below the floor: the per-frame cap stays at 1.05 * min_pixels (qwen-vl-utils)
    floor = VideoOptions(min_pixels=28 * 28 * 4, total_pixels=28 * 28)
    assert frame_size(480, 640, 16, floor) == smart_resize(480, 640, 28, 28 * 28 * 4, int(28 * 28 * 4 * 1.05))
    v = load_video(clips["mkv"], VideoOptions(max_frames=4, max_pixels=28 * 28 * 2), output="numpy")
    assert v.frames.shape == (4, *smart_resize(H, W, 28, 28 * 28, 28 * 28 * 2), 3)
    pil = load_video(clips["mkv"], VideoOptions(max_frames=4, max_pixels=28 * 28 * 2)).frames
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), v.frames)


def test_frame_list_equals_file(clips: dict[str, Path]) -> None:
    o = VideoOptions(fps=5, max_frames=6, frame_multiple=2, max_pixels=28 * 28 * 2)
    f = load_video(clips["mkv"], o, output="numpy")
    paths = load_video(_pngs(clips), o, source_fps=RATE, output="numpy")
    images = load_video([Image.open(p) for p in _pngs(clips)], o, source_fps=RATE, output="numpy")
    for v in (paths, images):
        np.testing.assert_array_equal(v.frames, f.frames)
        np.testing.assert_array_equal(v.indices, f.indices)
        np.testing.assert_allclose(v.timestamps, f.timestamps)
    no_rate = load_video(_pngs(clips), VideoOptions(fps=5, max_frames=6), output="numpy")
    assert no_rate.timestamps is None and no_rate.indices.tolist() == sample_indices(T, max_frames=6).tolist()


def test_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rot.mp4"
    frames = _frames(4)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264rgb", rate=RATE, options={"crf": "0"})
        s.width, s.height, s.pix_fmt = W, H, "rgb24"
        s.set_display_rotation(90)
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    v = load_video(path, output="numpy")
    np.testing.assert_array_equal(v.frames, np.rot90(frames, 1, axes=(1, 2)))


def _kind(src: object, **kw: object) -> str:
    with pytest.raises(VideoError) as e:
        load_video(src, **kw)  # type: ignore[arg-type]
    return e.value.kind


def test_bad_videos_each_have_their_kind(clips: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    assert _kind(tmp_path / "nope.mp4") == "missing"
    (tmp_path / "zero.mp4").write_bytes(b"")
    assert _kind(tmp_path / "zero.mp4") == "empty"
    assert _kind(b"") == "empty"
    for name in ("mkv", "mp4"):  # mkv: fewer packets than its duration says; mp4: no index (moov) left
        data = clips[name].read_bytes()
        (tmp_path / f"half.{name}").write_bytes(data[: len(data) // 2])
        assert _kind(tmp_path / f"half.{name}") == "corrupt"
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert _kind(tmp_path / "noise.mp4") == "corrupt"
    wav = tmp_path / "audio.wav"
    with av.open(str(wav), mode="w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    assert _kind(wav) == "no_video_stream"
    assert _kind(clips["mkv"], options=VideoOptions(max_frame_pixels=100)) == "too_large"
    # too many frames: refused from the header (mp4 count, duration) or the packet count (mkv), before decoding
    monkeypatch.setattr("mmembed.video._decode", lambda *a, **k: pytest.fail("decoded a video over the limit"))
    for name in ("mkv", "mp4"):
        assert _kind(clips[name], options=VideoOptions(max_decoded_frames=T - 5)) == "too_many_frames"
        assert _kind(clips[name], options=VideoOptions(max_duration_s=1.0)) == "too_many_frames"
    monkeypatch.undo()
    pngs = _pngs(clips)
    assert _kind(pngs, options=VideoOptions(max_decoded_frames=T - 1)) == "too_many_frames"
    bad = tmp_path / "bad.png"
    bad.write_bytes(pngs[0].read_bytes()[:100])
    assert _kind([*pngs[:5], bad, *pngs[6:]]) == "bad_frame"
    assert _kind([*pngs[:3], tmp_path / "gone.png"]) == "bad_frame"
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    assert _kind([*pngs[:3], tmp_path / "small.png"]) == "bad_frame"  # frames of one video share one size
    assert _kind([]) == "empty"


def test_skip_accounting_and_pickling() -> None:
    assert VIDEO_REASONS == tuple(f"video_{k}" for k in VIDEO_ERROR_KINDS)
    counter = SkipCounter()
    for kind in VIDEO_ERROR_KINDS:
        err = pickle.loads(pickle.dumps(VideoError("clip.mp4", kind, "detail")))
        assert (err.kind, err.source, err.detail) == (kind, "clip.mp4", "detail")
        bad = BadSample(video_reason(err), str(err))
        counter.skip("rows.jsonl:3", bad.reason, bad.detail)
    assert set(counter.skipped) == set(VIDEO_REASONS) and counter.read == len(VIDEO_ERROR_KINDS)
    with pytest.raises(ValueError):
        VideoError("x", "unknown kind", "")
    with pytest.raises(ValueError, match="unknown video option"):
        VideoOptions.from_mapping({"fps": 2, "max_frame": 8})
    assert VideoOptions.from_mapping({"fps": 2, "max_frames": 8}) == VideoOptions(fps=2, max_frames=8)

"""Safe video loading: a file (path or bytes) or a list of frames -> sampled, resized RGB frames.

Decoding goes through PyAV (``av`` on PyPI), whose wheels bundle FFmpeg's libraries, so nothing beyond
``pip install av`` is needed. The alternatives, as checked for this module (docs/video.md, "Library"):
decord's last release is 0.6.0 (2021) and is unmaintained; ``torchvision.io``'s video API was deprecated in 0.22
and removed in 0.26 (transformers' ``video_utils.py`` says so; the installed torchvision 0.29 no longer exports
``read_video``); torchcodec 0.17 installs without FFmpeg but its ``VideoDecoder`` fails to load without the
system's ``libavutil`` and must match the installed torch. transformers' own video loader defaults to PyAV too.

Sampling (:func:`sample_indices`) follows Qwen2-VL's ``Qwen2VLVideoProcessor.sample_frames``
(transformers ``models/qwen2_vl/video_processing_qwen2_vl.py``); resizing (:func:`frame_size`) its
``smart_resize`` with qwen-vl-utils' total-pixel cap. Every check that can run on the header runs before any
frame is decoded (missing, empty, no video stream, too many frames, frame too large), and decoding stops at the
last sampled frame and never passes ``max_decoded_frames``. Bad videos raise :class:`VideoError` with a ``kind``
from :data:`VIDEO_ERROR_KINDS`; :func:`mmembed.data.skips.video_reason` maps it to a skip category.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmembed.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, ImageError, load_image

__all__ = [
    "VideoError",
    "VIDEO_ERROR_KINDS",
    "VideoOptions",
    "Video",
    "load_video",
    "sample_indices",
    "smart_resize",
    "frame_size",
]

#: ``missing`` no such file; ``empty`` 0 bytes; ``corrupt`` truncated or undecodable; ``no_video_stream`` e.g.
#: audio only; ``too_many_frames`` over ``max_decoded_frames`` / ``max_duration_s``; ``too_large`` a frame over
#: the pixel limit; ``bad_aspect`` a frame too thin; ``bad_frame`` an unreadable or odd-sized frame in a frame list.
VIDEO_ERROR_KINDS = (
    "missing",
    "empty",
    "corrupt",
    "no_video_stream",
    "too_many_frames",
    "too_large",
    "bad_aspect",
    "bad_frame",
)

VideoSource = str | os.PathLike | bytes | Sequence[Any]


class VideoError(ValueError):
    """A video that cannot be used: ``source`` (path or description), ``kind`` (:data:`VIDEO_ERROR_KINDS`), detail."""

    def __init__(self, source: str, kind: str, detail: str) -> None:
        if kind not in VIDEO_ERROR_KINDS:
            raise ValueError(f"unknown video error kind {kind!r}; expected one of {VIDEO_ERROR_KINDS}")
        self.source, self.kind, self.detail = source, kind, detail
        super().__init__(f"{source}: {detail} [video_{kind}]")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # picklable across DataLoader workers
        return (type(self), (self.source, self.kind, self.detail))


@dataclass(frozen=True)
class VideoOptions:
    """How a video is sampled, resized and bounded (recipe keys and ``encode`` arguments of the same names).

    Attributes:
        fps: target sampling rate in frames per second of video; ``None`` keeps every frame (up to ``max_frames``).
        max_frames: most frames sampled, evenly spaced; ``None``: no cap.
        min_frames: fewest frames an ``fps`` sampling gives (Qwen2-VL's ``min_frames``, default 4 there).
        frame_multiple: the frame count is a multiple of this (2 = Qwen2-VL's ``temporal_patch_size``).
        min_pixels, max_pixels: per-frame resize budget (Qwen2-VL's ``size.shortest_edge`` / ``longest_edge``).
        total_pixels: budget over all sampled frames (frames x pixels); lowers the per-frame ``max_pixels``.
        factor: output sides are multiples of this (Qwen2-VL: ``patch_size * merge_size`` = 14 * 2).
        max_decoded_frames: refuse videos with more frames (checked from the header or by counting packets,
            before decoding; decoding never goes past it).
        max_duration_s: refuse videos longer than this (from the header); ``None``: no limit.
        max_frame_pixels: refuse frames with more pixels, before decoding (decompression-bomb guard).
        max_aspect_ratio: refuse frames whose long side is more than this many times the short side.
        frame_count_slack: frames a stream may fall short of its header's count (or duration x rate) before it
            counts as truncated.

    No resize happens unless one of ``min_pixels``, ``max_pixels``, ``total_pixels`` is set.
    """

    fps: float | None = None
    max_frames: int | None = None
    min_frames: int = 1
    frame_multiple: int = 1
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    factor: int = 28
    max_decoded_frames: int = 10_000
    max_duration_s: float | None = None
    max_frame_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    frame_count_slack: int = 2

    def __post_init__(self) -> None:
        for key in ("max_frames", "min_pixels", "max_pixels", "total_pixels"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"video {key} must be >= 1 or None, got {v}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"video fps must be > 0 or None, got {self.fps}")
        if self.min_frames < 1 or self.frame_multiple < 1 or self.factor < 1 or self.max_decoded_frames < 1:
            raise ValueError("video min_frames, frame_multiple, factor and max_decoded_frames must be >= 1")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"video min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> VideoOptions:
        """Options from a recipe section; an unknown key raises ``ValueError`` naming it."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown video option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def resizes(self) -> bool:
        return self.min_pixels is not None or self.max_pixels is not None or self.total_pixels is not None


@dataclass
class Video:
    """A decoded, sampled video.

    Attributes:
        frames: T RGB PIL images, or a uint8 array (T, H, W, 3).
        indices: (T,) int64 index of each frame in the source (repeats when the source is shorter than asked).
        timestamps: (T,) float64 seconds of each frame (presentation time); ``None`` for a frame list without a rate.
        source_fps: the source's frame rate (the stream's average rate), ``None`` when unknown.
        total_frames: frames in the source.
        source: how errors name the video.
    """

    frames: list[Image.Image] | np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray | None
    source_fps: float | None
    total_frames: int
    source: str

    def __len__(self) -> int:
        return len(self.indices)


def sample_indices(
    total: int,
    source_fps: float | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    min_frames: int = 1,
    frame_multiple: int = 1,
) -> np.ndarray:
    """Indices (T,) int64 of the frames to keep from a source of ``total`` frames, deterministic.

    As Qwen2-VL's ``sample_frames`` with ``fps`` (transformers ``video_processing_qwen2_vl.py``); m is
    ``frame_multiple``::

        cap = floor(min(max_frames, total) / m) * m
        n   = total / source_fps * fps          (duration x target rate; n = total without fps or source rate)
        n   = floor(min(max(n, min_frames), cap, total) / m) * m
        n   = max(n, m)                          (a source shorter than m repeats frames)
        index[i] = floor(i * total / n),  i = 0 .. n-1

    Qwen2-VL computes the last line as ``arange(0, total, total / n).int()`` in float32; the integer form here
    is its exact value. ``min_frames`` only applies with ``fps``, as in Qwen2-VL.
    """
    total, m = int(total), int(frame_multiple)
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got {total}")
    cap = total if max_frames is None else min(int(max_frames), total)
    cap = max(cap // m * m, m)
    n: float = float(total)
    if fps is not None and source_fps:
        n = max(total / float(source_fps) * float(fps), float(min_frames))
    count = max(math.floor(min(n, cap, total) / m) * m, m)
    return np.arange(count, dtype=np.int64) * total // count


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: float = 56 * 56, max_pixels: float = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """(height, width) with both sides multiples of ``factor``, ``min_pixels <= h*w <= max_pixels``, aspect kept.

    Qwen2-VL's rule, copied from transformers ``models/qwen2_vl/image_processing_qwen2_vl.py`` (``smart_resize``;
    the repo's own image path leaves resizing to the HF processor, so no mmembed copy existed before).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def frame_size(height: int, width: int, num_frames: int, options: VideoOptions) -> tuple[int, int]:
    """The (height, width) every frame is resized to under the per-frame and total budgets.

    Per-frame cap as qwen-vl-utils / Qwen2-VL's ``cap_pixels_per_frame``: ``max(min(max_pixels, total_pixels //
    num_frames), 1.05 * min_pixels)``; here ``total_pixels`` counts every frame (qwen-vl-utils counts frame pairs:
    its ``total_pixels`` is ours divided by ``temporal_patch_size``). Missing bounds: ``min_pixels = factor**2``,
    ``max_pixels`` unbounded. The 1.05 floor (qwen-vl-utils) wins over the total budget for very long videos;
    ``smart_resize``'s rounding to ``factor`` may still land a frame a little under ``min_pixels``, as in Qwen2-VL.
    """
    f = options.factor
    lo = float(options.min_pixels if options.min_pixels is not None else f * f)
    hi = float(options.max_pixels) if options.max_pixels is not None else math.inf
    if options.total_pixels is not None:
        hi = max(min(hi, options.total_pixels // max(num_frames, 1)), int(lo * 1.05))
    return smart_resize(height, width, f, lo, hi)


def _label(src: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return "<video bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else "<frame list>"


def _check_frame(label: str, w: int, h: int, o: VideoOptions) -> None:
    if w < 1 or h < 1:
        raise VideoError(label, "corrupt", f"degenerate frame size {w}x{h}")
    if w * h > o.max_frame_pixels:
        raise VideoError(label, "too_large", f"{w}x{h} frames exceed the pixel limit {o.max_frame_pixels}")
    if max(w, h) > o.max_aspect_ratio * min(w, h):
        raise VideoError(label, "bad_aspect", f"frame aspect ratio {w}:{h} exceeds {o.max_aspect_ratio:g}:1")


def _finish(label: str, arrays: list[np.ndarray], o: VideoOptions, output: str) -> list[Image.Image] | np.ndarray:
    """Resize the (H, W, 3) uint8 frames under the budgets; a list of PIL images or one (T, H, W, 3) array."""
    h, w = arrays[0].shape[:2]
    size = frame_size(h, w, len(arrays), o) if o.resizes else (h, w)
    images = None
    if size != (h, w):  # PIL bicubic, as Qwen2-VL's PIL image processor resamples
        images = [Image.fromarray(a).resize((size[1], size[0]), Image.Resampling.BICUBIC) for a in arrays]
        arrays = [np.asarray(im) for im in images]
    if output == "numpy":
        return np.stack(arrays)
    return images if images is not None else [Image.fromarray(a) for a in arrays]


def load_video(
    src: VideoSource,
    options: VideoOptions | None = None,
    *,
    source_fps: float | None = None,
    output: str = "pil",
    name: str | None = None,
) -> Video:
    """Open, check, sample and decode one video.

    Args:
        src: a video file (path or encoded bytes), or a list of frames (paths, bytes or PIL images; each decoded
            by :func:`mmembed.images.load_image` under ``options.max_frame_pixels``).
        options: sampling, resizing and limits (:class:`VideoOptions`).
        source_fps: a frame list's frame rate, when the row gives it (``fps`` sampling needs it; ignored for files,
            whose rate comes from the stream).
        output: ``"pil"`` (a list of RGB images) or ``"numpy"`` (uint8 (T, H, W, 3)).
        name: how errors name the video (defaults to the path).

    Raises:
        VideoError: see :data:`VIDEO_ERROR_KINDS`.
    """
    o = options or VideoOptions()
    if output not in ("pil", "numpy"):
        raise ValueError(f"output must be 'pil' or 'numpy', got {output!r}")
    label = _label(src, name)
    if isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)):
        return _load_file(src, o, output, label)
    if isinstance(src, Sequence):
        return _load_frames(src, o, source_fps, output, label)
    raise VideoError(label, "corrupt", f"expected a path, bytes or a list of frames, got {type(src).__name__}")


def _load_frames(frames: Sequence[Any], o: VideoOptions, source_fps: float | None, output: str, label: str) -> Video:
    """A list of frames as a video: sampled as a file would be, only the sampled frames decoded."""
    total = len(frames)
    if total == 0:
        raise VideoError(label, "empty", "the frame list is empty")
    if total > o.max_decoded_frames:
        raise VideoError(label, "too_many_frames", f"{total} frames exceed max_decoded_frames={o.max_decoded_frames}")
    if source_fps and o.max_duration_s is not None and total / source_fps > o.max_duration_s:
        raise VideoError(
            label, "too_many_frames", f"{total / source_fps:.2f} s exceeds max_duration_s={o.max_duration_s}"
        )
    idx = sample_indices(total, source_fps, o.fps, o.max_frames, o.min_frames, o.frame_multiple)
    decoded: dict[int, np.ndarray] = {}
    for i in np.unique(idx).tolist():
        item = frames[i]
        shown = item if isinstance(item, (str, os.PathLike)) else f"<{type(item).__name__}>"
        if isinstance(item, np.ndarray):  # an (H, W, 3) uint8 frame, as documented (load_image takes no arrays)
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise VideoError(
                    label, "bad_frame", f"frame {i}: expected (H, W, 3) uint8, got {item.dtype} {item.shape}"
                )
            try:
                _check_frame(label, item.shape[1], item.shape[0], o)
            except VideoError as e:
                raise VideoError(label, "bad_frame", f"frame {i}: {e.detail}") from None
            decoded[i] = np.ascontiguousarray(item)
            continue
        try:
            img = load_image(item, o.max_frame_pixels, name=f"frame {i} ({shown})", max_aspect_ratio=o.max_aspect_ratio)
        except ImageError as e:
            raise VideoError(label, "bad_frame", str(e)) from None
        decoded[i] = np.asarray(img, dtype=np.uint8)
    first = decoded[int(idx[0])]
    for i, a in decoded.items():
        if a.shape != first.shape:
            raise VideoError(
                label,
                "bad_frame",
                f"frame {i} is {a.shape[1]}x{a.shape[0]}, frame {int(idx[0])} is "
                f"{first.shape[1]}x{first.shape[0]}: all frames of a video must have one size",
            )
    times = idx.astype(np.float64) / float(source_fps) if source_fps else None
    out = _finish(label, [decoded[int(i)] for i in idx], o, output)
    return Video(out, idx, times, float(source_fps) if source_fps else None, total, label)


def _open(src: Any, label: str) -> Any:
    """``av.open`` for reading; FFmpeg's refusals become :class:`VideoError` (``corrupt``)."""
    import av

    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else str(src)
    try:
        return av.open(fp, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(label, "corrupt", f"cannot open: {e}") from None


def _header(container: Any, stream: Any) -> tuple[int, float | None, float | None]:
    """(frame count from the header or 0, frame rate or None, duration in seconds or None).

    The rate is the stream's average rate (as transformers' ``read_video_pyav``); a stream without timing (a raw
    ``.h264``: no duration) has a made-up average rate, so FFmpeg's guess (``av_guess_frame_rate``) is used there.
    """
    duration = None
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE: microseconds
    rate = (stream.average_rate or stream.guessed_rate) if duration else (stream.guessed_rate or stream.average_rate)
    return int(stream.frames or 0), float(rate) if rate else None, duration


def _load_file(src: Any, o: VideoOptions, output: str, label: str) -> Video:
    """A video file: header checks, frame count (header, else packets), sampling, decoding to the last index."""
    import av

    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise VideoError(label, "missing", "file not found")
        if path.stat().st_size == 0:
            raise VideoError(label, "empty", "empty file (0 bytes)")
    elif len(src) == 0:
        raise VideoError(label, "empty", "empty video bytes")
    limit = o.max_decoded_frames
    with _open(src, label) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(label, "no_video_stream", f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        _check_frame(label, stream.width, stream.height, o)
        count, fps, duration = _header(container, stream)
        if o.max_duration_s is not None and duration is not None and duration > o.max_duration_s:
            raise VideoError(label, "too_many_frames", f"{duration:.2f} s exceeds max_duration_s={o.max_duration_s}")
        expected = round(duration * fps) if duration and fps else 0
        if max(count, expected) > limit:
            raise VideoError(
                label, "too_many_frames", f"{max(count, expected)} frames exceed max_decoded_frames={limit}"
            )
        if count == 0:  # no count in the header (mkv, raw streams): count packets, no decoding, stop at the limit
            try:
                for packet in container.demux(stream):
                    if packet.size:
                        count += 1
                        if count > limit:
                            raise VideoError(label, "too_many_frames", f"more than max_decoded_frames={limit} frames")
            except av.FFmpegError as e:
                raise VideoError(label, "corrupt", f"cannot read packet {count}: {e}") from None
            if expected and count < expected - o.frame_count_slack:
                raise VideoError(label, "corrupt", f"truncated: {count} frames, the header's duration says {expected}")
    if count == 0:
        raise VideoError(label, "corrupt", "the video stream holds no frames")
    idx = sample_indices(count, fps, o.fps, o.max_frames, o.min_frames, o.frame_multiple)
    arrays, times, n, complete = _decode(src, label, idx, fps, limit)
    if not complete:  # the stream ended before the last sampled frame
        if n < count - o.frame_count_slack or n == 0:
            raise VideoError(label, "corrupt", f"truncated: the stream ended after {n} of {count} frames")
        count = n  # the header was off by a frame or two: sample the frames that are there
        idx = sample_indices(count, fps, o.fps, o.max_frames, o.min_frames, o.frame_multiple)
        arrays, times, n, complete = _decode(src, label, idx, fps, limit)
        if not complete:
            raise VideoError(label, "corrupt", f"the stream ended after {n} frames on a second read of {count}")
    picked = np.searchsorted(np.unique(idx), idx)
    out = _finish(label, [arrays[j] for j in picked], o, output)
    return Video(out, idx, np.asarray([times[j] for j in picked], dtype=np.float64), fps, count, label)


def _decode(
    src: Any, label: str, idx: np.ndarray, fps: float | None, limit: int
) -> tuple[list[np.ndarray], list[float], int, bool]:
    """Decode in order up to ``idx[-1]``, then stop.

    Returns:
        the sampled frames (one per distinct index, (H, W, 3) uint8, upright), their times in seconds, the number
        of frames decoded, and whether the last sampled frame was reached.
    """
    import av

    wanted = np.unique(idx).tolist()
    arrays: list[np.ndarray] = []
    times: list[float] = []
    n = 0
    with _open(src, label) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if n >= limit:
                    raise VideoError(label, "too_many_frames", f"more than max_decoded_frames={limit} frames decoded")
                if n == wanted[len(arrays)]:
                    arrays.append(_upright(frame.to_ndarray(format="rgb24"), frame.rotation))
                    t = frame.time
                    times.append(float(t) if t is not None else (n / fps if fps else float(n)))
                n += 1
                if len(arrays) == len(wanted):
                    break
        except av.FFmpegError as e:
            raise VideoError(label, "corrupt", f"cannot decode frame {n}: {e}") from None
    if arrays and any(a.shape != arrays[0].shape for a in arrays):
        raise VideoError(label, "corrupt", "the frame size changes within the stream")
    return arrays, times, n, len(arrays) == len(wanted)


def _upright(frame: np.ndarray, rotation: float | int | None) -> np.ndarray:
    """(H, W, 3) frame turned as the stream's display matrix says (the video's EXIF orientation).

    PyAV's ``VideoFrame.rotation`` is FFmpeg's ``av_display_rotation_get``: the counter-clockwise angle the
    display applies (FFmpeg's ``-autorotate`` turns the frame by it), so ``np.rot90`` (counter-clockwise) by
    ``rotation / 90`` quarter turns.
    """
    k = round((rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(frame, k)) if k else frame

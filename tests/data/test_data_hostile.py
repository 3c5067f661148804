"""Hostile data files: each is caught, named and survived (or stops a strict run with one clear line).

* A 1 x 100000 PNG (a few hundred bytes, far below ``max_pixels``) would become 64 x 6.4M pixels when
  resized by its shorter side: ``load_image`` refuses it from the header (``image_bad_aspect``) and
  ``ImageTransform`` never builds such an intermediate.
* A webdataset shard cut anywhere: a cut at a tar header boundary reads like a clean end of the archive,
  so the reader compares the samples read with ``shards.json`` (``truncated_shard``).
* ``data.strict`` with DataLoader workers: the worker's DataError reaches ``mmembed train`` as the same
  one-line ``mmembed: data error: FILE:ROW: ...`` (exit 2) as without workers.

Every broken file is written by the test itself.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmembed.data import (
    DataError,
    DatasetSpec,
    MixtureSampler,
    SampleDataset,
    SkipCounter,
    StepLoader,
    TrainBatches,
    WdsLoader,
    WdsStream,
    list_shards,
)
from mmembed.data.skips import image_reason
from mmembed.images import DEFAULT_MAX_ASPECT_RATIO, ImageError, ImageTransform, load_image
from tests.data.data_helpers import make_train_set

ROOT = Path(__file__).resolve().parents[2]
NOISE = re.compile(r"^[WI]\d{4} .*")  # torch's C++ log lines (e.g. "No CUDA runtime is found"), not ours


def _tool():
    spec = importlib.util.spec_from_file_location("convert_to_wds", ROOT / "tools" / "convert_to_wds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _thin_png(path: Path, size: tuple[int, int] = (1, 100_000)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path)
    return path


# ---------------------------------------------------------------- thin images


def test_thin_image_is_refused_from_the_header_and_named(tmp_path):
    thin = _thin_png(tmp_path / "thin.png")
    assert thin.stat().st_size < 2000  # tiny on disk, far below max_pixels: only the aspect ratio gives it away
    with pytest.raises(ImageError, match=r"thin\.png: aspect ratio 1:100000 exceeds the limit 200:1") as e:
        load_image(thin)
    assert image_reason(e.value) == "image_bad_aspect"
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(thin.read_bytes())
    with pytest.raises(ImageError, match="aspect ratio 100000:1"):
        load_image(Image.new("RGB", (100_000, 1)))
    # the limit itself is allowed (Qwen2-VL's processor refuses only > 200), one pixel more is not
    assert load_image(_thin_png(tmp_path / "ok.png", (2, 400))).size == (2, 400)
    with pytest.raises(ImageError, match="aspect ratio 2:401"):
        load_image(_thin_png(tmp_path / "bad.png", (2, 401)))
    assert load_image(thin, max_aspect_ratio=1e6).size == (1, 100_000)  # the caller can lift it


def test_thin_image_is_skipped_and_counted_by_the_training_readers(tmp_path):
    src = make_train_set(tmp_path / "src", 4)
    _thin_png(tmp_path / "src" / "images" / "2.png")  # row 2's image becomes a 1 x 100000 strip
    ds = SampleDataset(DatasetSpec("src", [src]))
    batches = TrainBatches([ds], MixtureSampler([4], global_batch_size=3, shuffle=False))
    samples, counter = batches.samples(0)
    assert [s.positive.text for s in samples] == ["label 0", "label 1", "label 3"]  # row 2 replaced by row 3
    assert counter.skipped == {"image_bad_aspect": 1} and counter.read == 4 and counter.good == 3
    assert counter.examples[0]["source"].endswith(":row 3") and "2.png" in counter.examples[0]["detail"]  # 1-based
    strict = TrainBatches([ds], MixtureSampler([4], global_batch_size=3, shuffle=False), strict=True)
    with pytest.raises(DataError, match=r"row 3: .*2\.png: aspect ratio 1:100000 .*\[image_bad_aspect\]"):
        strict.samples(0)

    tool = _tool()  # webdataset: refused at conversion (verified), or counted by the reader if it got in
    index = tool.convert(src, tmp_path / "verified", shard_size=2)
    assert index["total"] == 3 and SkipCounter.from_dict(index["skips"]).skipped == {"image_bad_aspect": 1}
    tool.convert(src, tmp_path / "raw", shard_size=2, verify=False)
    paths, counts = list_shards(tmp_path / "raw")
    loader = WdsLoader(WdsStream(paths, batch_size=2, shardshuffle=False, shard_counts=counts))
    texts = [s.positive.text for b in loader for s in b["samples"]]
    assert texts == ["label 0", "label 1", "label 3"]
    assert loader.skips.skipped == {"image_bad_aspect": 1} and not loader.skips.events


def test_thin_image_transform_memory_is_bounded():
    """A 1 x 100000 image through ImageTransform: +1.9 GB before the bound; now every resize stays small."""
    script = r"""
import json, resource, sys
import torch
from PIL import Image
from mmembed.images import ImageTransform, ImageError, load_image
kw = dict(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
shortest, squash = ImageTransform(**kw), ImageTransform(**kw, resize_mode="squash")
shortest(Image.new("RGB", (80, 60))), squash(Image.new("RGB", (80, 60)))  # warm up torch and PIL
tall, wide = Image.new("RGB", (1, 100_000), (200, 100, 50)), Image.new("RGB", (100_000, 1), (200, 100, 50))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
outs = [t(im) for t in (shortest, squash) for im in (tall, wide)]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
want = (torch.tensor([200.0, 100.0, 50.0]) / 255 - 0.5) / 0.5
ok = all(o.shape == (3, 64, 64) and torch.allclose(o, want.view(3, 1, 1).expand(3, 64, 64), atol=1e-6) for o in outs)
print(json.dumps({"growth_mib": (after - before) / 1024, "ok": ok}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ok"]  # the centre of a constant image is that constant
    assert got["growth_mib"] < 100, got


def test_thin_image_transform_never_builds_a_huge_intermediate(monkeypatch):
    """The resize calls themselves, recorded: each output is at most S x S for images beyond the limit."""
    sizes: list[tuple[int, int]] = []
    real = Image.Image.resize

    def resize(self, size, *a, **k):
        sizes.append(tuple(size))
        return real(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", resize)
    for mode in ("shortest", "squash"):
        t = ImageTransform(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize_mode=mode)
        for im in (Image.new("RGB", (1, 100_000)), Image.new("RGB", (100_000, 1)), Image.new("RGB", (3, 2000))):
            assert t(im).shape == (3, 32, 32)
    assert sizes and max(w * h for w, h in sizes) <= 32 * 32


def _old_transform(t: ImageTransform, img: Image.Image) -> torch.Tensor:
    """ImageTransform.__call__ before the aspect bound (shortest mode), kept to check nothing else moved."""
    s, (w, h) = t.size, img.size
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - s) // 2, (nh - s) // 2
    img = img.crop((left, top, left + s, top + s))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(torch.tensor(t.mean).view(3, 1, 1)).div_(torch.tensor(t.std).view(3, 1, 1))


@pytest.mark.parametrize("size", [(48, 40), (7, 1400), (1400, 7), (3, 600), (1, 200)])
def test_images_within_the_limit_are_transformed_exactly_as_before(size):
    assert max(size) <= DEFAULT_MAX_ASPECT_RATIO * min(size)
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
    t = ImageTransform(size=16, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))
    assert torch.equal(t(img), _old_transform(t, img))


def test_encode_refuses_a_thin_image_naming_it(tiny_model, tmp_path):
    thin = _thin_png(tmp_path / "thin.png")
    with pytest.raises(ValueError, match=r"row 1: image .*thin\.png: aspect ratio 1:100000 exceeds"):
        tiny_model.encode(texts=["a", "b"], images=[None, str(thin)])


# ---------------------------------------------------------------- truncated shards


@pytest.fixture
def two_shards(tmp_path):
    """10 samples in 2 shards of 5 (``shards.json`` lists the counts); returns the shard directory."""
    src = make_train_set(tmp_path / "src", 10)
    out = tmp_path / "shards"
    assert [s["count"] for s in _tool().convert(src, out, shard_size=5)["shards"]] == [5, 5]
    return out


def _read(paths, counts, strict=False, **kw):
    loader = WdsLoader(WdsStream(paths, batch_size=4, shardshuffle=False, shard_counts=counts, strict=strict), **kw)
    return [s.positive.text for b in loader for s in b["samples"]], loader.skips


def test_every_lossy_cut_of_a_shard_is_counted_and_stops_strict_mode(two_shards, tmp_path):
    import tarfile

    paths, counts = list_shards(two_shards)
    full, skips = _read(paths, counts)
    assert full == [f"label {i}" for i in range(10)] and not skips.events and not skips.skipped
    data = Path(paths[0]).read_bytes()
    with tarfile.open(paths[0]) as tf:
        members = tf.getmembers()
    content_end = members[-1].offset_data + members[-1].size  # after it: padding and zero blocks only
    rng = np.random.default_rng(1234)
    cuts = sorted({int(c) for c in rng.integers(0, content_end + 1024, size=50)})
    cuts += [m.offset for m in members]  # exactly at a header: reads like a clean end of the archive
    lossy = clean_end = 0
    for cut in cuts:
        Path(paths[0]).write_bytes(data[:cut])
        texts, skips = _read(paths, counts)
        assert texts[-5:] == full[-5:], cut  # survived: the next shard is read in full
        lost = 10 - len(texts)
        whole = sum(1 for m in members if m.name.endswith(".json") and m.offset >= cut)  # samples with no entry
        counted = skips.events.get("truncated_shard", 0) + skips.num_skipped
        if lost == 0:
            # nothing lost: only the tail after the last entry's data is gone, and no sample is blamed. A cut
            # inside that entry's 512-byte padding is a tar error (counted: the file is cut); in the zeros, silent.
            assert cut >= content_end and not skips.skipped, (cut, skips.to_dict())
            continue
        lossy += 1
        clean_end += cut in {m.offset for m in members}
        assert counted >= 1, (cut, skips.to_dict())  # detected ...
        assert skips.good + skips.num_skipped == skips.read and skips.events.get("truncated_shard", 0) <= 1
        if whole:  # ... whole missing samples by the shards.json count (or a tar error), naming the shard
            assert skips.events == {"truncated_shard": 1}, (cut, skips.to_dict())
        if skips.events:
            ex = next(e for e in skips.examples if e["reason"] == "truncated_shard")
            assert ex["source"] == paths[0], ex
        else:  # a clean end inside the last sample's image header: that sample is skipped, named by shard and key
            assert skips.skipped == {"image_missing": 1}, (cut, skips.to_dict())
            assert skips.examples[0]["source"] == f"{paths[0]}:000000004"
        with pytest.raises(DataError, match=r"shard-000000\.tar.*\[(truncated_shard|image_missing)\]"):
            _read(paths, counts, strict=True)
    assert lossy >= 30 and clean_end >= 5  # the draw exercised the cases above


def test_header_boundary_cut_says_how_many_samples_were_read(two_shards):
    paths, counts = list_shards(two_shards)
    data = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(data[: data.index(b"000000002.json")])  # the 512-byte header of sample 2 starts here
    texts, skips = _read(paths, counts)
    assert texts == [f"label {i}" for i in (0, 1, *range(5, 10))]
    assert skips.events == {"truncated_shard": 1} and not skips.skipped
    assert "read 2 of 5 samples" in skips.examples[0]["detail"] and skips.examples[0]["source"] == paths[0]
    with pytest.raises(DataError, match=r"shard-000000\.tar: read 2 of 5 samples .*\[truncated_shard\]"):
        _read(paths, counts, strict=True)


@pytest.mark.parametrize("resume_at", [0, 1, 3, 5, 7])
def test_resume_inside_a_shard_counts_the_skipped_samples_as_read(two_shards, resume_at):
    """Samples skipped on resume are part of the shard's count: no false alarm, and a cut is still seen."""
    paths, counts = list_shards(two_shards)

    def resumed(strict: bool = False):
        loader = WdsLoader(WdsStream(paths, batch_size=2, shardshuffle=False, shard_counts=counts, strict=strict))
        loader.load_state_dict({**loader.state_dict(), "raw": {"0": resume_at}})
        return [s.positive.text for b in loader for s in b["samples"]], loader.skips

    texts, skips = resumed()
    assert texts == [f"label {i}" for i in range(resume_at, 10)] and not skips.events
    data = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(data[: data.index(b"000000004.json")])  # shard 0 keeps samples 0..3 of 5
    texts, skips = resumed()
    assert texts == [f"label {i}" for i in (*range(resume_at, 4), *range(5, 10)) if i >= resume_at]
    if resume_at < 5:  # shard 0 is opened and read to its end: 4 of 5
        assert skips.events == {"truncated_shard": 1} and "read 4 of 5" in skips.examples[0]["detail"]
    else:  # shard 0 is skipped whole from its count, never opened
        assert not skips.events


# ---------------------------------------------------------------- strict mode through DataLoader workers


def test_data_error_survives_pickling():
    e = pickle.loads(pickle.dumps(DataError("a.parquet:row 3", "image_missing", "x.png: file not found")))
    assert (e.source, e.reason, e.detail) == ("a.parquet:row 3", "image_missing", "x.png: file not found")
    assert str(e) == "a.parquet:row 3: x.png: file not found [image_missing]"


@pytest.mark.parametrize("workers", [0, 1])
def test_strict_loaders_raise_the_real_data_error_from_workers(tmp_path, workers):
    src = make_train_set(tmp_path / "src", 6)
    (tmp_path / "src" / "images" / "4.png").unlink()
    ds = SampleDataset(DatasetSpec("src", [src]))
    batches = TrainBatches([ds], MixtureSampler([6], global_batch_size=2, shuffle=False), strict=True)
    loader = StepLoader(batches, max_steps=3, num_workers=workers)
    steps = []
    with pytest.raises(DataError) as e:
        for b in loader:
            steps.append(b["step"])
    assert type(e.value) is DataError and steps == [0, 1]  # steps 0 and 1 came through, step 2 holds row 4
    assert e.value.reason == "image_missing" and e.value.source.endswith(":row 5") and "4.png" in e.value.detail

    out = tmp_path / "shards"
    _tool().convert(make_train_set(tmp_path / "src2", 4), out, shard_size=2)
    paths, counts = list_shards(out)
    data = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(data[: data.index(b"000000001.json")])
    with pytest.raises(DataError) as e:
        _read(paths, counts, strict=True, num_workers=workers)
    assert type(e.value) is DataError and e.value.reason == "truncated_shard" and e.value.source == paths[0]


def _run_train(demo: Path, data: Path, out: Path, workers: int) -> subprocess.CompletedProcess:
    from tests.train.conftest import run_train, train_overrides

    extra = {"data.train": str(data), "data.eval": "", "data.strict": True, "data.num_workers": workers}
    return run_train(train_overrides(demo, out, **extra), env_extra={"TQDM_DISABLE": "1"})


def test_strict_train_with_workers_exits_2_with_one_line(demo_data, tmp_path):
    imgs = sorted((demo_data / "train" / "images").glob("*.png"))[:6]
    rows = [{"query": f"a caption {i}", "positive": {"image": str(p)}} for i, p in enumerate(imgs)]
    rows.append({"query": "missing", "positive": {"image": str(tmp_path / "nope.png")}})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = []
    for workers in (1, 0):
        proc = _run_train(demo_data, data, tmp_path / f"run{workers}", workers)
        assert proc.returncode == 2, (workers, proc.stderr[-3000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not NOISE.match(ln)]
        assert len(lines) == 1, (workers, proc.stderr[-3000:])
        assert lines[0].startswith("mmembed: data error: ") and "Traceback" not in proc.stderr
        assert f"{data}:line 7: " in lines[0] and "nope.png: file not found [image_missing]" in lines[0]
        messages.append(lines[0])
    assert messages[0] == messages[1]


def test_strict_train_on_a_truncated_shard_with_workers_exits_2(demo_data, tmp_path):
    out = tmp_path / "shards"
    _tool().convert(demo_data / "train.yaml", out, shard_size=20)
    paths, _ = list_shards(out)
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(data[: data.index(b"000000025.json")])  # shard 1: 5 of 20 samples left
    proc = _run_train(demo_data, out, tmp_path / "run", 1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not NOISE.match(ln)]
    assert lines == [
        f"mmembed: data error: {paths[1]}: read 5 of 20 samples (shards.json): the shard ends early [truncated_shard]"
    ], proc.stderr[-3000:]

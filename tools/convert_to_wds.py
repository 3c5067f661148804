"""Convert MMEB-train / pairs data (a manifest, a directory or a file) into webdataset tar shards.

    python tools/convert_to_wds.py data/demo/train.yaml --out shards/ [--shard-size 1000]

Samples are written in reader order (datasets in manifest order, rows in file order), so the
shards read back in the same order as the source when shuffling is off. Images are stored as their
original encoded bytes (no re-encoding); metadata as ``<key>.json`` (layout: mmembed/data/wds.py).
Manifest instructions are resolved at conversion time (paraphrases picked from ``--seed``). Bad
samples (bad rows, missing/undecodable images with ``--verify``, the default) are skipped and
counted; ``--strict`` stops at the first. The output is byte-for-byte deterministic (fixed tar
metadata). ``shards.json`` lists the shards with their sample counts and the skip report. Progress (rows read,
samples/s, ETA, skips so far) goes to stderr: a bar on a terminal, a line every ~5% elsewhere
(``MMEMBED_PROGRESS=off`` silences it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmembed.data.dataset import SampleDataset  # noqa: E402
from mmembed.data.formats import MMEB_PLACEHOLDER  # noqa: E402
from mmembed.data.manifest import resolve_datasets  # noqa: E402
from mmembed.data.sample import Sample, Side  # noqa: E402
from mmembed.data.skips import BadSample, SkipCounter, image_reason  # noqa: E402
from mmembed.data.wds import INDEX_NAME, side_to_json  # noqa: E402
from mmembed.images import DEFAULT_MAX_PIXELS, ImageError, load_image  # noqa: E402
from mmembed.progress import Progress  # noqa: E402


def _image_bytes(im: Any, verify: bool, max_pixels: int) -> tuple[bytes, str]:
    """(encoded bytes, extension) of one image reference."""
    if isinstance(im, (str, os.PathLike)):
        p = Path(im)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise BadSample("image_missing", f"{p}: file not found") from None
        ext = p.suffix.lower().lstrip(".") or "img"
    elif isinstance(im, (bytes, bytearray)):
        data, ext = bytes(im), "img"
    else:  # a PIL image
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data, ext = buf.getvalue(), "png"
    if verify:
        try:
            load_image(data, max_pixels, name=str(im) if not isinstance(im, bytes) else None)
        except ImageError as e:
            raise BadSample(image_reason(e), str(e)) from None
    return data, ext


def encode_sample(sample: Sample, key: str, verify: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """A Sample -> the tar entries of one webdataset sample (``__key__``, ``json``, images)."""
    entries: dict[str, Any] = {"__key__": key}

    def side(s: Side, prefix: str) -> dict[str, Any]:
        names = []
        for i, im in enumerate(s.images):
            data, ext = _image_bytes(im, verify, max_pixels)
            name = f"{prefix}{i}.{ext}"
            entries[name] = data
            names.append(name)
        return side_to_json(s, names)

    meta = {
        "query": side(sample.query, "q"),
        "positive": side(sample.positive, "p"),
        "negatives": [side(n, f"n{j}_") for j, n in enumerate(sample.negatives)],
        "dataset": sample.dataset,
        "source": sample.source,
        "meta": sample.meta,
    }
    entries["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
    return entries


def write_shards(
    samples: Iterable[Sample],
    out: str | Path,
    shard_size: int = 1000,
    counter: SkipCounter | None = None,
    verify: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefix: str = "shard",
) -> list[dict[str, Any]]:
    """Write samples into ``out/<prefix>-NNNNNN.tar``; returns ``[{"name", "count"}]`` per shard."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counter = counter if counter is not None else SkipCounter()
    shards: list[dict[str, Any]] = []
    writer, fh, n = None, None, 0
    for sample in samples:
        try:
            entries = encode_sample(sample, f"{n:09d}", verify, max_pixels)
        except BadSample as e:  # the reader counted it as good (it does not decode images)
            counter.reclassify(sample.source, e.reason, e.detail)
            continue
        if writer is None or shards[-1]["count"] >= shard_size:
            if writer is not None:
                writer.close()
                fh.close()
            name = f"{prefix}-{len(shards):06d}.tar"
            fh = open(out / name, "wb")
            writer = wds.TarWriter(fh, user="mmembed", group="mmembed", mtime=0, encoder=False)
            shards.append({"name": name, "count": 0})
        writer.write(entries)
        shards[-1]["count"] += 1
        n += 1
    if writer is not None:
        writer.close()
        fh.close()
    return shards


def convert(
    src: str | Path,
    out: str | Path,
    *,
    shard_size: int = 1000,
    image_root: str | None = None,
    seed: int = 0,
    verify: bool = True,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Convert every dataset of ``src`` into shards under ``out``; returns the ``shards.json`` content."""
    counter = SkipCounter(strict=strict)
    specs = resolve_datasets(src, image_root)
    datasets = [SampleDataset(spec, placeholder=MMEB_PLACEHOLDER, seed=seed, max_pixels=max_pixels) for spec in specs]
    progress = Progress(sum(len(ds) for ds in datasets), "convert", "samples")

    def samples() -> Iterable[Sample]:
        """Every good sample in reader order (datasets in manifest order, rows in file order); counts progress."""
        skipped = 0
        for ds in datasets:
            for i in range(len(ds)):
                sample = ds.get(i, counter, decode=False)
                if counter.num_skipped != skipped:
                    skipped = counter.num_skipped
                    progress.set_postfix(f"{skipped} skipped")
                progress.update(1)
                if sample is not None:
                    yield sample

    with progress:
        shards = write_shards(samples(), out, shard_size, counter, verify, max_pixels)
    index = {
        "format": "mmembed-wds-1",
        "source": str(src),
        "datasets": [s.name for s in specs],
        "total": sum(s["count"] for s in shards),
        "shards": shards,
        "skips": counter.to_dict(),
    }
    (Path(out) / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", help="manifest YAML, directory of parquet/JSONL files, or one file")
    ap.add_argument("--out", required=True, help="output directory for the shards")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--image-root", default=None, help="folder for relative image paths (default: each file's)")
    ap.add_argument("--seed", type=int, default=0, help="seed for instruction paraphrase choice")
    ap.add_argument("--no-verify", action="store_true", help="do not decode images while converting")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    a = ap.parse_args(argv)
    index = convert(
        a.src,
        a.out,
        shard_size=a.shard_size,
        image_root=a.image_root,
        seed=a.seed,
        verify=not a.no_verify,
        strict=a.strict,
        max_pixels=a.max_pixels,
    )
    print(f"wrote {index['total']} samples in {len(index['shards'])} shards to {a.out}")
    print(SkipCounter.from_dict(index["skips"]).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

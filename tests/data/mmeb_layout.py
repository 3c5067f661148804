"""A small MMEB download, generated in tmp_path: the Hugging Face layouts of MMEB-train and MMEB-eval.

``MMEB-train/<subset>/original-00000-of-00001.parquet`` and ``diverse_instruction-00000-of-00001.parquet`` with the
real MMEB-train columns, images in ``MMEB-train/images/<subset>/`` named ``images/<subset>/i.png`` in the rows
(relative to the folder holding ``images/``, as VLM2Vec's ``--image_dir MMEB-train/``); ``MMEB-eval/<subset>/
test-00000-of-00001.parquet`` with the MMEB-eval (V1) columns, images in ``MMEB-eval/eval_images/<subset>/`` named
``<subset>/i.png`` (relative to ``eval_images/``, as ``--image_dir eval_images/``).
"""

from __future__ import annotations

from pathlib import Path

from tests.data.data_helpers import make_image, write_parquet

CLS_INST = "<|image_1|> Represent the given image for classification.\n"
T2I_INST = "Find me an everyday image that matches the given caption: "
#: the diverse_instruction split: the same rows, the instruction paraphrased (one per row, cycling)
CLS_PARAPHRASES = ("<|image_1|> What object does this picture show?\n", "<|image_1|> Name the category.\n")
LABELS = ("red", "green", "blue", "yellow")
COLORS = ((220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 220, 20))


def _cls_train(i: int, paraphrase: bool) -> dict:
    inst = CLS_PARAPHRASES[i % 2] if paraphrase else CLS_INST
    k = i % len(LABELS)
    return {
        "qry": inst,
        "qry_image_path": f"images/ImageNet_1K/{i}.png",
        "pos_text": LABELS[k],
        "pos_image_path": "",
        "neg_text": LABELS[(k + 1) % len(LABELS)],
        "neg_image_path": "",
    }


def _t2i_train(i: int, paraphrase: bool) -> dict:
    inst = "Retrieve the picture described here: " if paraphrase else T2I_INST
    return {
        "qry": f"{inst}a {LABELS[i % len(LABELS)]} square {i}\n",
        "qry_image_path": "",
        "pos_text": "<|image_1|> Represent the given image.\n",
        "pos_image_path": f"images/MSCOCO_t2i/{i}.png",
        "neg_text": "",
        "neg_image_path": "",
    }


def make_mmeb_train(root: Path, n: int = 8) -> Path:
    """``root/MMEB-train`` with subsets ImageNet_1K (classification) and MSCOCO_t2i (retrieval)."""
    out = root / "MMEB-train"
    for subset, row in (("ImageNet_1K", _cls_train), ("MSCOCO_t2i", _t2i_train)):
        for i in range(n):
            make_image(out / "images" / subset / f"{i}.png", COLORS[i % len(COLORS)], size=16)
        write_parquet([row(i, False) for i in range(n)], out / subset / "original-00000-of-00001.parquet")
        write_parquet([row(i, True) for i in range(n)], out / subset / "diverse_instruction-00000-of-00001.parquet")
    return out


def make_mmeb_eval(root: Path, n: int = 4) -> Path:
    """``root/MMEB-eval`` with ImageNet-1K (each query vs the 4 labels) and MSCOCO_t2i (each caption vs 3 images)."""
    out = root / "MMEB-eval"
    cls_rows, t2i_rows = [], []
    for i in range(n):
        make_image(out / "eval_images" / "ImageNet-1K" / f"{i}.png", COLORS[i % len(COLORS)], size=16)
        make_image(out / "eval_images" / "MSCOCO_t2i" / f"{i}.png", COLORS[(i + 1) % len(COLORS)], size=16)
        k = i % len(LABELS)
        cls_rows.append(
            {
                "qry_text": CLS_INST,
                "qry_img_path": f"ImageNet-1K/{i}.png",
                "tgt_text": [LABELS[(k + j) % len(LABELS)] for j in range(len(LABELS))],
                "tgt_img_path": [""] * len(LABELS),
            }
        )
        cands = [i, (i + 1) % n, (i + 2) % n]
        t2i_rows.append(
            {
                "qry_text": f"{T2I_INST}a {LABELS[(i + 1) % len(LABELS)]} square\n",
                "qry_img_path": "",
                "tgt_text": ["<|image_1|> Represent the given image.\n"] * len(cands),
                "tgt_img_path": [f"MSCOCO_t2i/{c}.png" for c in cands],
            }
        )
    write_parquet(cls_rows, out / "ImageNet-1K" / "test-00000-of-00001.parquet")
    write_parquet(t2i_rows, out / "MSCOCO_t2i" / "test-00000-of-00001.parquet")
    return out

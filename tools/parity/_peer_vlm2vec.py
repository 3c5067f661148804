"""The VLM2Vec side of tools/parity/vlm2vec.py: runs in the peer's venv (transformers 4.51.3, vlm2vec-for-pyserini).

Builds a tiny random Qwen2-VL with VLM2Vec's own bundled class, saves it with its processor (the checkpoint both sides
load), then embeds the rows of ``rows.json`` exactly as VLM2Vec's eval does: ``process_input_text`` for the text,
``Qwen2_VL_process_fn`` for the batch, ``MMEBModel.encode_input`` (last-token pooling, L2-normalized) for the vectors
(``src/model/processor.py`` and ``src/model/model.py`` of TIGER-Lab/VLM2Vec, as packaged in vlm2vec-for-pyserini
0.2.0). Writes ``peer.npz``: token ids, attention mask, the M-RoPE positions the LLM received, embeddings of a first
and a second call (VLM2Vec's Qwen2-VL caches ``rope_deltas`` after the first), the InfoNCE loss and scores.

Usage (the orchestrator calls it): ``PEER_PYTHON _peer_vlm2vec.py WORK_DIR``. Not imported by mmembed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def build_llava_next(work: Path, spec: dict) -> Path:
    """A tiny LLaVA-Next saved by VLM2Vec's bundled class, with a LlavaNextProcessor (CLIP-style tiles)."""
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, PreTrainedTokenizerFast
    from vlm2vec_for_pyserini.model.baseline_backbone.llava_next import LlavaNextForConditionalGeneration
    from vlm2vec_for_pyserini.model.baseline_backbone.llava_next.processing_llava_next import LlavaNextProcessor

    ckpt = work / "checkpoint"
    torch.manual_seed(spec["seed"])
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(**spec["config"])).eval()
    model.save_pretrained(ckpt, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer.json"), **spec["special_tokens"])
    tok.padding_side = spec["padding_side"]
    size = spec["image_size"]
    image = LlavaNextImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=spec["config"]["image_grid_pinpoints"],
    )
    LlavaNextProcessor(
        image_processor=image,
        tokenizer=tok,
        patch_size=spec["config"]["vision_config"]["patch_size"],
        vision_feature_select_strategy=spec["config"]["vision_feature_select_strategy"],
        num_additional_image_tokens=1,
        image_token="<image>",
    ).save_pretrained(ckpt)
    return ckpt


def build_checkpoint(work: Path, spec: dict) -> Path:
    if spec["family"] == "llava_next":
        return build_llava_next(work, spec)
    from vlm2vec_for_pyserini.model.vlm_backbone.qwen2_vl import Qwen2VLForConditionalGeneration
    from vlm2vec_for_pyserini.model.vlm_backbone.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig
    from vlm2vec_for_pyserini.model.vlm_backbone.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from vlm2vec_for_pyserini.model.vlm_backbone.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from vlm2vec_for_pyserini.model.vlm_backbone.qwen2_vl.tokenization_qwen2_fast import Qwen2TokenizerFast

    ckpt = work / "checkpoint"
    torch.manual_seed(spec["seed"])
    config = Qwen2VLConfig(**spec["config"])
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(ckpt, safe_serialization=True)
    tok = Qwen2TokenizerFast(tokenizer_file=str(work / "tokenizer.json"), **spec["special_tokens"])
    tok.padding_side = spec["padding_side"]
    image = Qwen2VLImageProcessor(min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"])
    Qwen2VLProcessor(image_processor=image, tokenizer=tok).save_pretrained(ckpt)
    return ckpt


def main(work: Path) -> None:
    from vlm2vec_for_pyserini.loss import SimpleContrastiveLoss
    from vlm2vec_for_pyserini.model.model import MMEBModel
    from vlm2vec_for_pyserini.model.processor import (
        backbone2model,
        load_processor,
        process_input_text,
        process_vlm_inputs_fns,
    )

    spec = json.loads((work / "spec.json").read_text())
    ckpt = build_checkpoint(work, spec)

    family = spec["family"]  # VLM2Vec's backbone name: qwen2_vl | llava_next

    class Args:  # the fields load_processor reads from VLM2Vec's ModelArguments / DataArguments
        checkpoint_path, model_name, model_backbone = None, str(ckpt), family
        resize_min_pixels, resize_max_pixels = spec["min_pixels"], spec["max_pixels"]

    if family == "llava_next":
        # load_processor's LLaVA-Next branch imports LlavaNextProcessor from the package's llava_next/__init__,
        # which does not export it (ImportError in 0.2.0); load the class that branch means, from its module
        from vlm2vec_for_pyserini.model.baseline_backbone.llava_next.processing_llava_next import LlavaNextProcessor

        processor = LlavaNextProcessor.from_pretrained(ckpt)
    else:
        processor = load_processor(Args, Args)
    encoder = backbone2model[family].from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="sdpa")
    model = MMEBModel(encoder.eval(), pooling="last", normalize=True, temperature=spec["temperature"])
    model.model_backbone = family
    process_fn = process_vlm_inputs_fns[family]

    rows = spec["rows"]
    texts = [
        process_input_text(r["instruction"], family, text=r["text"], add_image_token=r["image"] is not None)
        for r in rows
    ]
    images = [[Image.open(work / r["image"]).convert("RGB")] if r["image"] else None for r in rows]
    seen: list[torch.Tensor] = []
    lm = encoder.model if family == "qwen2_vl" else encoder.language_model.model
    lm.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    # VLM2Vec's LLaVA-Next batching stacks pixel arrays, so a batch holds image rows or text rows, not both
    # (Llava_NEXT_process_fn); Qwen2-VL's takes mixed batches. Rows are embedded in those groups, in row order.
    groups = (
        [list(range(len(rows)))]
        if family == "qwen2_vl"
        else [[i for i, r in enumerate(rows) if r["image"]], [i for i, r in enumerate(rows) if not r["image"]]]
    )
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for call in ("first", "second"):
            emb = np.zeros((len(rows), spec["config"].get("hidden_size", 64)), dtype=np.float32)
            ids, pos = [None] * len(rows), [None] * len(rows)
            for g in groups:
                batch = process_fn({"text": [texts[i] for i in g], "images": [images[i] for i in g]}, processor)
                batch = {k: v for k, v in batch.items() if k not in ("texts", "images")}
                mask = batch["attention_mask"].clone()
                input_ids = batch["input_ids"].clone()
                emb[g] = model.encode_input(batch).numpy()
                p = seen[-1]
                if p is None:  # the LLM numbers positions itself: 0..L-1 over the padded row (cache_position)
                    p = torch.arange(mask.shape[1]).expand(mask.shape[0], -1)
                p = p if p.ndim == 3 else p.unsqueeze(0).expand(3, -1, -1)
                for j, i in enumerate(g):
                    m = mask[j].bool()
                    ids[i], pos[i] = input_ids[j][m].tolist(), p[:, j][:, m].tolist()
            out[f"emb_{call}"] = emb
    width = max(len(x) for x in ids)
    out["input_ids"] = np.array([x + [-1] * (width - len(x)) for x in ids])
    out["attention_mask"] = np.array([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    out["positions_first"] = np.array([[a + [0] * (width - len(a)) for a in p3] for p3 in pos]).transpose(1, 0, 2)
    emb = torch.from_numpy(out["emb_first"])
    q, t = emb[spec["queries"]], emb[spec["targets"]]
    out["loss"] = np.array(float(SimpleContrastiveLoss(temperature=spec["temperature"])(q, t)))
    out["scores"] = (q @ t.T).numpy()
    # the gradient of that loss on the last decoder layer's output projection (query and target groups together,
    # each embedded with grad as VLM2Vec's trainer does without GradCache)
    reps = torch.zeros(len(rows), emb.shape[1])
    for g in groups:
        batch = process_fn({"text": [texts[i] for i in g], "images": [images[i] for i in g]}, processor)
        batch = {k: v for k, v in batch.items() if k not in ("texts", "images")}
        reps = reps.index_put((torch.tensor(g),), model.encode_input(batch))
    SimpleContrastiveLoss(temperature=spec["temperature"])(reps[spec["queries"]], reps[spec["targets"]]).backward()
    out["grad_o_proj"] = lm.layers[-1].self_attn.o_proj.weight.grad.numpy()
    np.savez(work / "peer.npz", **out)
    score_official(work)
    (work / "peer_texts.json").write_text(json.dumps(texts, indent=1))
    print(f"peer: {len(rows)} rows embedded by VLM2Vec's code, checkpoint at {ckpt}")


def score_official(work: Path) -> None:
    """VLM2Vec-V2's scoring (``eval.py``: ``np.argsort(-score)`` over the candidates, positive first; its
    ``RankingMetrics`` in ``src/eval_utils/metrics.py``) of the score rows in ``metric_scores.npy``."""
    from vlm2vec_for_pyserini.utils.eval_utils.metrics import RankingMetrics

    scores = np.load(work / "metric_scores.npy")
    result = {}
    # numpy's default argsort is not stable (SIMD sorts in numpy 2.x): among tied candidates VLM2Vec's order then
    # depends on the numpy build; "stable" is its positive-first intent (V1 takes np.argmax, the first maximum)
    for kind in ("default", "stable"):
        order = {"default": lambda s: np.argsort(-s), "stable": lambda s: np.argsort(-s, kind="stable")}[kind]
        cases = [{"prediction": order(s).tolist(), "label": [0], "rel_scores": None} for s in scores]
        result[kind] = RankingMetrics(["hit", "recall", "ndcg", "mrr"]).evaluate(cases)
    (work / "peer_metrics.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""``mmembed export MODEL_DIR OUT --to hf|sentence-transformers``: a saved mmembed model for other runtimes.

- ``hf``: native VLM backbones (Qwen2-VL / Qwen2.5-VL, LLaVA / LLaVA-Next with their own visual path): a
  transformers checkpoint (``from_pretrained(OUT)`` offline; LoRA/DoRA were merged when mmembed saved the model) with
  its processor and mmembed's row layout as the chat template, plus sentence-transformers' ``Transformer`` ->
  ``Pooling`` [-> ``Dense``] [-> ``Normalize``] files (:mod:`mmembed.export.hf`). Settings plain transformers cannot
  express (a connector swap, token merging/pruning, an mmembed pooler...) are refused, naming the setting
  (:func:`mmembed.export.plan.native_blockers`). Text-only decoder models (``hf_causal_lm`` without vision,
  last-token pooling) become a ``<Model>ForCausalLM`` checkpoint with the same files, no chat template
  (:mod:`mmembed.export.text`).
- ``sentence-transformers``: the same as ``hf`` when it can express the model, else one
  :class:`mmembed.export.st_module.MMEmbedModule` (the whole mmembed model as a sentence-transformers module).

Nothing here imports DeepSpeed. docs/export.md has the layout, the parity measured and what is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmembed.export.plan import ExportError, native_blockers

__all__ = ["export_model", "ExportError", "native_blockers", "TARGETS"]

TARGETS = ("hf", "sentence-transformers")


def _requirements() -> dict[str, Any]:
    """``config_sentence_transformers.json`` ``requirements`` of a composed export: mmembed at this version or newer
    (sentence-transformers checks them before any module loads and prints the reason)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        spec = f">={version('mmembed')}"
    except PackageNotFoundError:
        spec = ""
    return {
        "mmembed": {
            "specifier": spec,
            "reason": "The module mmembed.export.st_module.MMEmbedModule comes from mmembed: pip install mmembed[st]",
        }
    }


def export_model(
    model_dir: str | os.PathLike, out: str | os.PathLike, to: str = "hf", *, overwrite: bool = False
) -> Path:
    """Export the mmembed model directory ``model_dir`` to ``out`` for ``to`` (``hf`` | ``sentence-transformers``).

    The folder is written under a temporary name beside ``out`` and renamed when complete.

    Args:
        model_dir: a directory written by :func:`mmembed.io.save_model` (loaded with :func:`mmembed.load`, fp32).
        out: the export folder; an existing one needs ``overwrite``.
        to: the target.
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        ExportError: ``to`` is unknown, ``out`` exists, or ``to="hf"`` and the model has a setting transformers
            cannot express (the message names each one and says to use ``--to sentence-transformers``).
    """
    import mmembed
    from mmembed import io

    if to not in TARGETS:
        raise ExportError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out.resolve() == model_dir.resolve():
        raise ExportError("OUT must differ from MODEL_DIR")
    model = mmembed.load(model_dir, dtype="float32").eval()
    meta = io.read_config(model_dir / io.CONFIG_NAME)
    blockers = native_blockers(model)
    if to == "hf" and blockers:
        raise ExportError("cannot export to hf:\n- " + "\n- ".join(blockers))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if blockers:
            _write_composed(model, meta, tmp)
        else:
            _write_native(model, meta, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.chmod(tmp, 0o777 & ~_umask())
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _write_native(model: Any, meta: dict[str, Any], out: Path) -> None:
    from mmembed.backbones.native import NativeVLM
    from mmembed.export.hf import write_hf_checkpoint, write_st_config, write_st_transformer

    if isinstance(model.backbone, NativeVLM):
        info = write_hf_checkpoint(model, out)
        modules = write_st_transformer(model, out, info["hidden_size"])
    else:  # a text-only decoder (plan.text_blockers)
        from mmembed.export.text import st_prompts, write_text_checkpoint

        info = write_text_checkpoint(model, out)
        modules = write_st_transformer(model, out, info["hidden_size"], text_only=True)
        meta = {**meta, "prompts": st_prompts(dict(meta.get("prompts") or {}))}
    write_st_config(out, meta, modules, {})
    _write_card(out, meta, "hf")


def _write_composed(model: Any, meta: dict[str, Any], out: Path) -> None:
    from mmembed.export.hf import write_st_config
    from mmembed.export.st_module import MODEL_FOLDER
    from mmembed.io import save_model

    save_model(model, out / MODEL_FOLDER)
    modules = [{"idx": 0, "name": "0", "path": MODEL_FOLDER, "type": "mmembed.export.st_module.MMEmbedModule"}]
    write_st_config(out, meta, modules, {"requirements": _requirements()})
    _write_card(out, meta, "sentence-transformers")


def _write_card(out: Path, meta: dict[str, Any], kind: str) -> None:
    """A short README.md: how to load the export (the mmembed card stays in the composed module's folder)."""
    prompts = json.dumps(meta.get("prompts") or {})
    if kind == "hf":
        load = 'model = SentenceTransformer("path/to/this/dir")'
        extra = (
            "transformers: `AutoModel.from_pretrained(dir)` (last-token hidden state of the processor's chat-template "
            "output is the unnormalized embedding). vLLM: `vllm serve path/to/this/dir --runner pooling`."
        )
    else:
        load = 'model = SentenceTransformer("path/to/this/dir", trust_remote_code=True)  # pip install mmembed[st]'
        extra = "The module class is mmembed's own (mmembed.export.st_module.MMEmbedModule)."
    text = (
        "---\nlibrary_name: sentence-transformers\npipeline_tag: feature-extraction\ntags: [mmembed, embeddings]\n"
        f"---\n# mmembed export ({kind})\n\n```python\n"
        f"from sentence_transformers import SentenceTransformer\n\n{load}\n"
        'q = model.encode_query(["a red circle"])\nd = model.encode_document([{"image": pil_image, "text": "caption"}])'
        f"\n```\n\nSaved prompts: `{prompts}`; similarity: {meta.get('similarity')}. {extra}\n"
    )
    (out / "README.md").write_text(text)

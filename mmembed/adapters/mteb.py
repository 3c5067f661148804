"""An mteb 2.x encoder over an mmembed model: ``mteb.evaluate(MMEmbedEncoder("out/model"), tasks)``.

:class:`MMEmbedEncoder` implements mteb's ``EncoderProtocol`` (``mteb/models/models_protocols.py``; it subclasses
``mteb.models.AbsEncoder`` for mteb's prompt helpers):

- ``encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type, **kwargs)`` reads the ``text`` and ``image``
  columns of each batch mteb's ``DataLoader`` yields (``BatchedInput``: a corpus's ``text`` is already its title and
  body joined, a query's ``text`` already holds its instruction where the task has one; images are PIL images, a list
  of them for a multi-image row, or pixel tensors) and embeds them with ``encode_query`` for
  ``PromptType.query``, ``encode_document`` for ``PromptType.document`` and ``encode`` for ``None`` (symmetric
  tasks: classification, clustering, STS), so the model's saved ``query`` / ``document`` prompts apply as in
  sentence-transformers' mteb wrapper.
- A prompt found by mteb's own lookup (``task name-prompt type``, ``task name``, ``task type-prompt type``,
  ``task type``, ``prompt type``) in ``model_prompts`` (the model's saved prompts, updated by the argument) wins
  and is passed as literal text (``prompt=``). With ``use_task_prompts=True`` a task's own ``metadata.prompt``
  (its entry for the prompt type when it is a dict, else the one string, for queries and symmetric tasks only) comes
  before the generic ``query`` / ``document`` prompts but after the task-name and task-type ones.
- ``similarity`` / ``similarity_pairwise`` are the model's (its ``similarity_fn_name``: cosine, dot, euclidean or
  manhattan), as torch tensors.
- ``mteb_model_meta`` is a ``ModelMeta`` built by :func:`model_meta` (name, a revision that fingerprints the
  weights, parameter count, embedding width, modalities, similarity); for a model directory its ``loader`` reloads
  it, so ``mteb.evaluate(meta, tasks)`` works too.

Requires the ``mteb`` extra: ``pip install mmembed[mteb]``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmembed.adapters._common import encode_role, missing, resolve_model
from mmembed.model import EmbeddingModel

try:
    import mteb
except ModuleNotFoundError as e:
    raise ImportError(missing("mmembed.adapters.mteb", "mteb >= 2", "mteb")) from e
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from torch.utils.data import DataLoader

__all__ = ["MMEmbedEncoder", "model_meta", "fingerprint"]

if int(str(getattr(mteb, "__version__", "0")).split(".")[0]) < 2:
    raise ImportError(missing("mmembed.adapters.mteb", f"mteb >= 2 (found {mteb.__version__})", "mteb"))


def fingerprint(model: EmbeddingModel) -> str:
    """A short hex digest of the weights (every tensor's name, shape, dtype and first and last values).

    Cheap at any size and different for differently trained weights; mteb files results by name and revision, so
    two models under one name never share cached results.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]) if flat.numel() > 128 else flat
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_meta(
    model: EmbeddingModel,
    name: str | None = None,
    revision: str | None = None,
    path: str | os.PathLike | None = None,
    **overrides: Any,
) -> ModelMeta:
    """An mteb ``ModelMeta`` describing ``model``.

    Args:
        model: the loaded model.
        name: mteb's ``organization/model`` name; default ``mmembed/<directory name>`` (or ``mmembed/model``).
        revision: default :func:`fingerprint` of the weights.
        path: the model directory it was loaded from; then the meta's ``loader`` reloads it
            (``mteb.evaluate(meta, tasks)``, ``meta.load_model()``).
        **overrides: other ``ModelMeta`` fields (``languages``, ``license``, ``training_datasets``, ...).
    """
    if name is None:
        name = f"mmembed/{Path(path).resolve().name}" if path is not None else "mmembed/model"
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fields: dict[str, Any] = dict(
        loader=_load_encoder if path is not None else None,
        loader_kwargs={"path": str(path)} if path is not None else {},
        name=name,
        revision=revision or fingerprint(model),
        n_parameters=n_params,
        memory_usage_mb=round(n_bytes / 2**20, 2),
        max_tokens=model.cfg.max_length,
        embed_dim=model.get_embedding_dimension(),
        framework=["PyTorch"],
        similarity_fn_name=ScoringFunction(model.similarity_fn_name),
        use_instructions=bool(model.cfg.prompts),
        modalities=["text", "image"] if model.visual is not None else ["text"],
    )
    fields.update(overrides)
    return ModelMeta.create_empty(overwrites=fields)


def _load_encoder(model_name: str, revision: str | None = None, *, path: str, **kwargs: Any) -> MMEmbedEncoder:
    """``ModelMeta.loader`` of a model directory: mteb calls it as ``loader(name, revision=..., **loader_kwargs)``."""
    return MMEmbedEncoder(path, revision, model_name=model_name, **kwargs)


def _column(batch: Mapping[str, Any], key: str) -> list[Any] | None:
    values = batch.get(key)
    if values is None:
        return None
    return list(values) if not isinstance(values, list) else values


class MMEmbedEncoder(AbsEncoder):
    """mteb's ``EncoderProtocol`` over an mmembed model (see the module docstring for the mapping).

    Args:
        model: a loaded :class:`~mmembed.EmbeddingModel` or a model directory (loaded with :func:`mmembed.load`).
        revision: the mteb revision to report; default a fingerprint of the weights.
        device: where to run (a directory is loaded there; a loaded model is moved there).
        model_name: mteb's ``organization/model`` name (default ``mmembed/<directory name>``).
        model_prompts: mteb-style prompts (keys: task names, task types, ``query`` / ``document``, or
            ``"<task name or type>-<query|document>"``), on top of the model's saved prompts.
        use_task_prompts: use the task's own ``metadata.prompt`` when no task-name or task-type prompt matches
            (before the generic ``query`` / ``document`` prompts).
        embed_dim: keep the first ``embed_dim`` dimensions (Matryoshka; ``mmembed.load(truncate_dim=)``); mteb's
            ``ModelMeta.load_model(embed_dim=)`` passes it.
        meta_overrides: extra ``ModelMeta`` fields (``languages``, ``license``, ...).
        **load_kwargs: for a directory, more :func:`mmembed.load` options (``dtype``, ``similarity_fn_name``...).
    """

    mteb_model_meta: ModelMeta

    def __init__(
        self,
        model: EmbeddingModel | str | os.PathLike,
        revision: str | None = None,
        *,
        device: str | None = None,
        model_name: str | None = None,
        model_prompts: Mapping[str, str] | None = None,
        use_task_prompts: bool = False,
        embed_dim: int | None = None,
        meta_overrides: Mapping[str, Any] | None = None,
        **load_kwargs: Any,
    ) -> None:
        path = None if isinstance(model, EmbeddingModel) else model
        if path is not None:
            if device is not None:
                load_kwargs["device"] = device
            if embed_dim is not None:
                load_kwargs["truncate_dim"] = embed_dim
        self.model = resolve_model(model, **load_kwargs)
        if path is None and device is not None:
            self.model.to(device)
        #: the width ``encode`` keeps (``None``: the model's own ``truncate_dim``); a loaded model is left unchanged
        self.truncate_dim = embed_dim if path is None else None
        self.model_prompts = {**self.model.cfg.prompts, **dict(model_prompts or {})} or None
        self.use_task_prompts = use_task_prompts
        overrides = dict(meta_overrides or {})
        if embed_dim is not None:
            overrides.setdefault("embed_dim", embed_dim)
        self.mteb_model_meta = model_meta(self.model, model_name, revision, path, **overrides)

    # ------------------------------------------------------------------------------------------
    # prompts

    def resolve_prompt(self, task_metadata: TaskMetadata | None, prompt_type: PromptType | None) -> str | None:
        """The literal prompt for this task and prompt type, or ``None`` (the role's saved prompt then applies).

        ``task_metadata=None`` (a direct call outside mteb) looks up the prompt type alone.
        """
        if task_metadata is None:
            key = prompt_type.value if prompt_type is not None else None
            return (self.model_prompts or {}).get(key) if key else None
        name = get_prompt_name(self.model_prompts, task_metadata, prompt_type)
        generic = name is None or (prompt_type is not None and name == prompt_type.value)
        if self.use_task_prompts and generic:
            task_prompt = self.task_prompt(task_metadata, prompt_type)
            if task_prompt:
                return task_prompt
        return self.model_prompts[name] if name is not None else None

    @staticmethod
    def task_prompt(task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        """The task's own ``metadata.prompt`` for this prompt type: its entry when it is a dict, else the one string
        for queries and symmetric tasks (``prompt_type=None``) but not for documents."""
        task_prompt = task_metadata.prompt
        if isinstance(task_prompt, Mapping):
            return task_prompt.get(prompt_type.value) if prompt_type is not None else None
        if task_prompt and prompt_type != PromptType.document:
            return str(task_prompt)
        return None

    # ------------------------------------------------------------------------------------------
    # EncoderProtocol

    def encode(
        self,
        inputs: DataLoader[Any],
        *,
        task_metadata: TaskMetadata | None,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """(N, d) float32 embeddings of every row of every batch of ``inputs``, in order.

        ``kwargs``: mteb's ``EncodeKwargs`` (``batch_size``, ``show_progress_bar``, ``precision``); others are
        ignored. Raises ``ValueError`` for a batch with neither ``text`` nor ``image`` (audio, video).
        """
        from tqdm.auto import tqdm

        prompt_type = PromptType(prompt_type) if prompt_type is not None else None
        role = prompt_type.value if prompt_type is not None else None  # "query" | "document" | None
        prompt = self.resolve_prompt(task_metadata, prompt_type)
        encode_kwargs: dict[str, Any] = {"batch_size": int(kwargs.get("batch_size") or 32), "show_progress_bar": False}
        if self.truncate_dim is not None:
            encode_kwargs["truncate_dim"] = self.truncate_dim
        if kwargs.get("precision") is not None:
            encode_kwargs["precision"] = kwargs["precision"]
        if prompt:
            encode_kwargs["prompt"] = prompt
        show = bool(kwargs.get("show_progress_bar", False))
        out: list[np.ndarray] = []
        for batch in tqdm(inputs, desc=f"mmembed {getattr(task_metadata, 'name', '')}", disable=not show, unit="batch"):
            texts, images = self._batch_rows(batch)
            out.append(encode_role(self.model, role, texts, images, **encode_kwargs))
        if not out:
            return encode_role(self.model, role, [], None, **encode_kwargs)
        return np.concatenate(out, axis=0)

    @staticmethod
    def _batch_rows(batch: Mapping[str, Any]) -> tuple[list[str | None] | None, list[Any] | None]:
        """The ``texts`` and ``images`` of one mteb batch (an empty text next to an image becomes ``None``)."""
        texts, images = _column(batch, "text"), _column(batch, "image")
        if texts is None and images is None:
            raise ValueError(
                f"mmembed encodes text and images; this batch has the columns {sorted(batch)} (no 'text' or 'image')"
            )
        if texts is not None:
            texts = [None if t is None else str(t) for t in texts]
        if texts is not None and images is not None:
            texts = [None if img is not None and not (t or "").strip() else t for t, img in zip(texts, images)]
        return texts, images

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """(N, M) scores with the model's ``similarity_fn_name`` (a torch tensor, as mteb's own scorers give)."""
        return self.model.similarity(_as_tensor(embeddings1), _as_tensor(embeddings2))

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """(N,) row-wise scores with the model's ``similarity_fn_name``."""
        return self.model.similarity_pairwise(_as_tensor(embeddings1), _as_tensor(embeddings2))

    def __repr__(self) -> str:
        return f"MMEmbedEncoder({self.mteb_model_meta.name!r}, revision={self.mteb_model_meta.revision!r})"


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))

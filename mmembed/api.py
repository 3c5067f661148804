"""sentence-transformers-style output of :meth:`EmbeddingModel.encode`: prompts, truncation, quantization, similarity.

The semantics follow sentence-transformers 6.3 (``SentenceTransformer.encode`` / ``encode_query`` /
``encode_document``, ``util.truncate_embeddings``, ``quantization.quantize_embeddings``, ``SimilarityFunction``), so
code written for it gives the same numbers here; ``tests/test_api_parity.py`` compares each function with
sentence-transformers' own on the same vectors. The order is sentence-transformers': the model's output (L2-normalized
when ``model.normalize``), then truncation to ``truncate_dim`` (no re-normalization), then ``normalize_embeddings``,
then quantization. Nothing here needs sentence-transformers installed (docs/architecture.md §1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PRECISIONS",
    "SIMILARITY_FUNCTIONS",
    "QUERY_PROMPTS",
    "DOCUMENT_PROMPTS",
    "quantize_embeddings",
    "quantization_ranges",
    "truncate_embeddings",
    "similarity",
    "similarity_pairwise",
    "check_precision",
    "check_truncate_dim",
    "check_similarity_fn_name",
    "resolve_instruction",
    "role_prompt",
    "postprocess",
    "saved_settings_problem",
]

log = logging.getLogger(__name__)

#: ``precision=`` values (sentence-transformers' ``ALLOWED_PRECISIONS``)
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
#: ``similarity_fn_name`` values (sentence-transformers' ``SimilarityFunction`` names for single-vector models)
SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
#: saved prompt names ``encode_query`` / ``encode_document`` use, first match wins (sentence-transformers' order)
QUERY_PROMPTS = ("query",)
DOCUMENT_PROMPTS = ("document", "passage", "corpus")

_NOTED: set[tuple[str, tuple[str, ...]]] = set()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def check_truncate_dim(value: Any, full_dim: int | None = None, key: str = "truncate_dim") -> int | None:
    """``None`` or an integer in ``1..full_dim``.

    sentence-transformers clamps a larger value to the model's width silently; here it is an error, since asking for
    more dimensions than the model has is a mistake (a wrong model or a typo) that slicing would hide.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
    if full_dim is not None and value > full_dim:
        raise ValueError(f"{key}={value} exceeds the model's embedding dimension {full_dim}")
    return int(value)


def check_similarity_fn_name(value: Any) -> str:
    """A name of :data:`SIMILARITY_FUNCTIONS`; a sentence-transformers ``SimilarityFunction`` member also works."""
    name = getattr(value, "value", value)  # an Enum member gives its value
    if name not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"similarity_fn_name must be one of {', '.join(SIMILARITY_FUNCTIONS)}, got {value!r}")
    return str(name)


def saved_settings_problem(meta: Mapping[str, Any]) -> str | None:
    """What is wrong with a model directory's ``similarity``, ``truncate_dim`` and ``matryoshka_dims`` (read from
    ``mmembed_config.json`` by :func:`mmembed.io.read_config`, applied by ``mmembed.load``), or ``None``."""
    sim, td, md = meta.get("similarity"), meta.get("truncate_dim"), meta.get("matryoshka_dims")
    width = meta.get("embed_dim") if type(meta.get("embed_dim")) is int else None

    def ok(d: Any) -> bool:
        return type(d) is int and d >= 1 and (width is None or d <= width)

    if sim is not None and sim not in SIMILARITY_FUNCTIONS:
        return f"similarity {sim!r} is not one of {', '.join(SIMILARITY_FUNCTIONS)}"
    if td is not None and not ok(td):
        return f"truncate_dim {td!r} must be an integer in 1..embed_dim ({width})"
    if md is not None and not (isinstance(md, list) and md and all(ok(d) for d in md)):
        return f"matryoshka_dims {md!r} must be a list of integers in 1..embed_dim ({width})"
    return None


# ----------------------------------------------------------------------------------------------
# truncation and quantization


def truncate_embeddings(embeddings: np.ndarray | torch.Tensor, truncate_dim: int | None) -> np.ndarray | torch.Tensor:
    """The first ``truncate_dim`` dimensions, ``(..., D) -> (..., d)``, not re-normalized (``None``: unchanged).

    Matryoshka embeddings (Kusupati et al., NeurIPS 2022) are trained so that each prefix is a usable embedding;
    sentence-transformers' ``util.truncate_embeddings`` is the same slice.
    """
    return embeddings[..., :truncate_dim]


def _as_numpy(embeddings: Any) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu()
        return (embeddings.float() if embeddings.dtype == torch.bfloat16 else embeddings).numpy()
    return np.asarray(embeddings)


def quantization_ranges(
    embeddings: np.ndarray, precision: str = "int8", calibration_embeddings: np.ndarray | None = None
) -> np.ndarray:
    """(2, D) per-dimension ``[min; max]`` of ``calibration_embeddings`` (default: of ``embeddings`` themselves).

    As sentence-transformers' ``_get_quantization_ranges``: one embedding alone cannot calibrate (error), fewer than
    100 give a warning. Reuse the ranges of a representative set (``quantize_embeddings(..., ranges=)``) so that
    queries and documents share their buckets.
    """
    if calibration_embeddings is None:
        if embeddings.ndim == 1 or embeddings.shape[0] == 1:
            raise ValueError(
                f"Cannot compute {precision} quantization ranges from a single embedding; pass ranges or "
                "calibration_embeddings from a representative set of embeddings"
            )
        if embeddings.shape[0] < 100:
            log.warning(
                "computing %s quantization buckets from %d embeddings; ranges or calibration_embeddings from more "
                "embeddings make them more stable",
                precision,
                len(embeddings),
            )
        calibration_embeddings = embeddings
    calibration_embeddings = _as_numpy(calibration_embeddings)
    return np.vstack((np.min(calibration_embeddings, axis=0), np.max(calibration_embeddings, axis=0)))


def quantize_embeddings(
    embeddings: np.ndarray | torch.Tensor,
    precision: str,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """Float embeddings (N, D) (or (D,)) at a lower precision, as sentence-transformers' ``quantize_embeddings``.

    - ``float32``: cast, (N, D) float32.
    - ``int8`` / ``uint8``: scalar quantization with per-dimension buckets: ``step = (max - min) / 255`` (1 where
      ``max == min``), ``q = clip(floor((x - min) / step), 0, 255)``; uint8 is ``q``, int8 is ``q - 128``. ``min`` and
      ``max`` come from ``ranges`` (2, D), else from ``calibration_embeddings``, else from ``embeddings`` (see
      :func:`quantization_ranges`).
    - ``binary`` / ``ubinary``: ``x > 0`` packed 8 dims per byte (``np.packbits``, big-endian bit order, the last
      byte zero-padded), (N, ceil(D / 8)); ubinary is uint8, binary is int8 ``packed - 128``.

    Raises:
        ValueError: an unknown precision, already-integer embeddings, or int8/uint8 ranges asked of one embedding.
    """
    check_precision(precision)
    embeddings = _as_numpy(embeddings)
    if embeddings.dtype in (np.uint8, np.int8):
        raise ValueError("embeddings to quantize must be float, not int8 or uint8")
    if embeddings.ndim == 2 and embeddings.shape[0] == 0:
        dim = embeddings.shape[1]
        if precision.endswith("int8"):
            return np.zeros((0, dim), dtype=np.int8 if precision == "int8" else np.uint8)
        if precision.endswith("binary"):
            return np.zeros((0, (dim + 7) // 8), dtype=np.int8 if precision == "binary" else np.uint8)
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("int8"):
        if ranges is None:
            ranges = quantization_ranges(embeddings, precision, calibration_embeddings)
        ranges = np.asarray(ranges).astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    packed = np.packbits(embeddings > 0, axis=-1)
    return packed if precision == "ubinary" else (packed - 128).astype(np.int8)


def postprocess(
    embeddings: torch.Tensor,
    truncate_dim: int | None = None,
    normalize_embeddings: bool = False,
    precision: str = "float32",
    convert_to: str = "numpy",
) -> np.ndarray | torch.Tensor:
    """(N, D) float32 model output -> what ``encode`` returns: truncated, optionally normalized, quantized, converted.

    ``normalize_embeddings`` L2-normalizes after truncation (sentence-transformers normalizes in ``_inference`` after
    ``truncate_embeddings``); without it a truncated unit vector keeps its norm below 1, which cosine similarity does
    not mind but a plain dot product does. Quantization sees the whole output at once (its int8/uint8 ranges are
    this output's own, as in sentence-transformers' ``encode``).
    """
    out = truncate_embeddings(embeddings, truncate_dim)
    if normalize_embeddings:
        out = F.normalize(out, p=2, dim=1)
    if precision != "float32":
        q = quantize_embeddings(out, precision)
        return torch.from_numpy(q) if convert_to == "torch" else q
    return out.contiguous() if convert_to == "torch" else np.ascontiguousarray(out.numpy())


# ----------------------------------------------------------------------------------------------
# similarity


def _as_batch(x: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    """A 2-D floating tensor (a 1-D vector becomes one row), on ``like``'s device and dtype when given."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if like is not None:
        t = t.to(device=like.device, dtype=like.dtype)
    elif not t.is_floating_point():
        t = t.float()
    return t.unsqueeze(0) if t.ndim == 1 else t


def similarity(a: Any, b: Any, fn_name: str = "cosine") -> np.ndarray | torch.Tensor:
    """(N, M) scores of every row of ``a`` (N, D) against every row of ``b`` (M, D); larger is more similar.

    ``cosine`` (rows L2-normalized first), ``dot`` (``a @ b.T``), ``euclidean`` (``-||a_i - b_j||_2``) and
    ``manhattan`` (``-||a_i - b_j||_1``), computed as sentence-transformers' ``cos_sim``, ``dot_score``,
    ``euclidean_sim`` and ``manhattan_sim`` (``torch.cdist`` for the distances). A torch ``a`` gives a tensor
    (``b`` is moved to its device and dtype), anything else a numpy array; a 1-D input counts as one row. Integer
    input (int8/uint8 quantized embeddings) is scored as float; packed binary embeddings need a Hamming distance
    instead (e.g. a FAISS binary index).
    """
    name = check_similarity_fn_name(fn_name)
    ta = _as_batch(a)
    tb = _as_batch(b, like=ta)
    if name == "cosine":
        s = F.normalize(ta, p=2, dim=-1) @ F.normalize(tb, p=2, dim=-1).T
    elif name == "dot":
        s = ta @ tb.T
    else:
        s = -torch.cdist(ta, tb, p=2.0 if name == "euclidean" else 1.0)
    return s if isinstance(a, torch.Tensor) else s.cpu().numpy()


def similarity_pairwise(a: Any, b: Any, fn_name: str = "cosine") -> np.ndarray | torch.Tensor:
    """(N,) scores of row i of ``a`` against row i of ``b`` (sentence-transformers' ``pairwise_*`` functions)."""
    name = check_similarity_fn_name(fn_name)
    ta = _as_batch(a)
    tb = _as_batch(b, like=ta)
    if ta.shape != tb.shape:
        raise ValueError(
            f"pairwise similarity needs inputs of the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}"
        )
    if name == "cosine":
        s = (F.normalize(ta, p=2, dim=-1) * F.normalize(tb, p=2, dim=-1)).sum(dim=-1)
    elif name == "dot":
        s = (ta * tb).sum(dim=-1)
    elif name == "euclidean":
        s = -torch.sqrt(((ta - tb) ** 2).sum(dim=-1))
    else:
        s = -(ta - tb).abs().sum(dim=-1)
    return s if isinstance(a, torch.Tensor) else s.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# prompts


def resolve_instruction(
    prompts: Mapping[str, str],
    instruction: str | Sequence[str | None] | None,
    prompt: str | None = None,
    prompt_name: str | None = None,
) -> str | Sequence[str | None] | None:
    """The instruction ``encode`` uses: at most one of ``instruction`` (a saved prompt name or any text, or one per
    row), ``prompt`` (literal text, as sentence-transformers' ``prompt=``) and ``prompt_name`` (a saved name; an
    unknown one is an error naming the saved ones, as in sentence-transformers)."""
    given = [k for k, v in (("instruction", instruction), ("prompt", prompt), ("prompt_name", prompt_name)) if v]
    if len(given) > 1:
        raise ValueError(f"give at most one of instruction, prompt and prompt_name, got {' and '.join(given)}")
    if prompt_name:
        if prompt_name not in prompts:
            saved = ", ".join(repr(k) for k in prompts) or "none"
            raise ValueError(f"prompt_name {prompt_name!r} is not a saved prompt of this model (saved: {saved})")
        return prompts[prompt_name]
    if prompt:
        return prompt
    if isinstance(instruction, str) or instruction is None:
        return prompts.get(instruction, instruction) if instruction else None
    return instruction


def role_prompt(prompts: Mapping[str, str], role: str) -> str | None:
    """The saved prompt name ``encode_query`` (``role="query"``) or ``encode_document`` (``"document"``) uses.

    ``query`` for queries; ``document``, else ``passage``, else ``corpus`` for documents (sentence-transformers'
    order). When the model has none, the rows get no instruction, as in sentence-transformers (then ``encode_query``
    and ``encode`` give the same embeddings); this is logged once at INFO level, not warned: many models are trained
    without named prompts (MMEB instructions are per dataset) and code ported from sentence-transformers must not
    start printing.
    """
    names = QUERY_PROMPTS if role == "query" else DOCUMENT_PROMPTS
    for name in names:
        if name in prompts:
            return name
    key = (role, tuple(sorted(prompts)))
    if key not in _NOTED:
        _NOTED.add(key)
        log.info(
            "encode_%s: the model has no saved %s prompt (saved: %s); encoding without an instruction",
            role,
            " / ".join(repr(n) for n in names),
            ", ".join(repr(k) for k in prompts) or "none",
        )
    return None

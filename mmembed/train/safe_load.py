"""Load DeepSpeed checkpoints without letting them run code.

DeepSpeed 0.19.8 reads its checkpoint files with ``torch.load(..., weights_only=False)`` (the torch checkpoint
engine, ZeRO-3's optimizer loader, ``zero_to_fp32``), i.e. with the full pickle machinery: a file placed in a run
folder would execute whatever its ``__reduce__`` says as soon as a run resumes from it. Inside
:func:`restricted_torch_load` every ``torch.load`` call is forced to ``weights_only=True`` with an explicit
allow-list of the few non-tensor types DeepSpeed writes, so tensors, containers and those types load, and
anything else is refused before it can run, with an error naming the file.

The allow-list was found empirically: checkpoints saved with the tiny recipe at ZeRO 0, 1, 2 and 3, fp32 and
bf16, AdamW and SGD, with and without LoRA, then ``torch.serialization.get_unsafe_globals_in_checkpoint`` on
every file. Model-states files (every stage) need nothing beyond what ``weights_only`` already allows; the ZeRO
optimizer shards need exactly:

- ``deepspeed.runtime.zero.config.ZeroStageEnum`` (an ``int`` enum: the stage, stored under ``zero_stage``),
- ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` (the static loss scaler object, a plain ``cur_scale`` holder,
  stored even in fp32 and bf16 runs),
- ``deepspeed.utils.tensor_fragment.fragment_address`` (a ``numel``/``start`` dataclass, ZeRO 1 and 2 only).

``DynamicLossScaler`` (fp16 training, which recipes do not offer) is deliberately not listed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["CheckpointError", "UnsafeCheckpointError", "allowed_globals", "restricted_torch_load", "safe_torch_load"]


class CheckpointError(ValueError):
    """A training checkpoint that cannot be used (corrupt, incomplete, unsafe, or not writable): names the path."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file needs a Python object outside the allow-list to unpickle: it is refused, never run."""


def allowed_globals() -> list[Any]:
    """The non-tensor types DeepSpeed 0.19.8 stores in its checkpoints (see the module docstring)."""
    # imported here: deepspeed is heavy and only the training extras install it
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def _name(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, "name", f))


def safe_torch_load(f: Any, map_location: Any = None, *, mmap: bool | None = None, _load: Any = None) -> Any:
    """``torch.load(f, weights_only=True)`` with :func:`allowed_globals`; errors name ``f``.

    Raises:
        UnsafeCheckpointError: the file needs a global outside the allow-list (it could run code).
        CheckpointError: the file cannot be read (truncated, not a torch file, I/O error).
    """
    load = _load or torch.load
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message says "Unsupported global: GLOBAL x.y" and then suggests weights_only=False, which is
        # exactly what must not happen here: keep only the first line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{_name(f)}: refused to unpickle a checkpoint file that needs more than tensors and DeepSpeed's own "
            f"metadata types (a checkpoint must not run code); {detail}"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"{_name(f)}: cannot read this checkpoint file ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def restricted_torch_load() -> Iterator[None]:
    """While active, every ``torch.load`` call (DeepSpeed's included) goes through :func:`safe_torch_load`.

    DeepSpeed calls ``torch.load`` by attribute (``import torch``; ``torch.load(...)``), so replacing the
    attribute reaches every call site without patching DeepSpeed. ``weights_only=False`` and a custom
    ``pickle_module`` from the caller are ignored on purpose: the weights-only unpickler is the point.
    The patch is process-wide for the duration; use it around checkpoint loading only.
    """
    original = torch.load

    @functools.wraps(original)
    def patched(f: Any, map_location: Any = None, pickle_module: Any = None, *, mmap: bool | None = None, **_: Any):
        return safe_torch_load(f, map_location, mmap=mmap, _load=original)

    torch.load = patched
    try:
        yield
    finally:
        torch.load = original

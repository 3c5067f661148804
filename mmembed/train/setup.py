"""Training-side preparation of a model: freezing, LoRA (peft), gradient checkpointing, optimizer, schedule."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from mmembed.config import ConfigError, TrainCfg

__all__ = ["ContrastiveTask", "prepare_model", "apply_lora", "merge_lora", "make_optimizer", "make_scheduler"]

SLOTS = ("vision", "connector", "merge", "prune", "backbone", "pooler", "fusion", "proj")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_dora", "init")


class ContrastiveTask(nn.Module):
    """The model and its loss in one module, so one DeepSpeed engine owns every trainable parameter
    (a learnable temperature included); open_clip's ``TrainingTask`` idea.

    ``forward(batch) -> (B, D)`` embeddings of one processor batch.
    """

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        fusion = getattr(model, "fusion", None)
        has_micl = fusion is not None and getattr(fusion, "micl_token_id", None) is not None
        self.micl_weight: float | None = float(fusion.micl_weight) if has_micl else None
        # the collator's content ids of the targets reach losses that take them (false-negative masking)
        self.loss_takes_keys = "target_keys" in inspect.signature(loss.forward).parameters

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D), or (B, 2D) = [main | mICL visual] when the model has a NoteLLM-2 mICL token, so GradCache
        caches both representations as one tensor."""
        if self.micl_weight is None:
            return self.model(batch)
        emb, aux = self.model.forward_with_aux(batch)
        return torch.cat([emb, aux["visual"]], dim=-1)

    def compute_loss(
        self,
        q: torch.Tensor,
        t: torch.Tensor,
        negative_mask: torch.Tensor | None = None,
        target_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The loss to differentiate and its stats. With mICL: ``(1 - w) L(main) + w L(visual)`` (NoteLLM-2,
        arXiv 2405.16789; default w = 0.1, i.e. 9:1), both InfoNCE over the same batch."""
        kw: dict[str, Any] = {"negative_mask": negative_mask, "return_stats": True}
        if self.loss_takes_keys:
            kw["target_keys"] = target_keys
        if self.micl_weight is None:
            return self.loss(q, t, **kw)
        d = q.shape[1] // 2
        main, stats = self.loss(q[:, :d], t[:, :d], **kw)
        visual, vstats = self.loss(q[:, d:], t[:, d:], **kw)
        w = self.micl_weight
        stats = {**stats, "loss": (1 - w) * stats["loss"] + w * vstats["loss"], "micl_loss": vstats["loss"]}
        return (1 - w) * main + w * visual, stats


def apply_lora(model: nn.Module, lora: dict[str, Any]) -> None:
    """Wrap the backbone's HF model with peft LoRA adapters (``train.lora``); the base weights freeze.

    Keys: ``r`` (16), ``alpha`` (2 r), ``dropout`` (0.05), ``target_modules`` (module-name suffixes or a
    regex; default the attention and MLP projections), ``use_dora`` (False), ``init`` (peft's
    ``init_lora_weights``, True). A pattern that matches nothing is a :class:`ConfigError`.
    """
    from peft import LoraConfig, get_peft_model

    unknown = set(lora) - set(LORA_KEYS)
    if unknown:
        raise ConfigError(f"train.lora.{sorted(unknown)[0]}", f"unknown LoRA key; allowed: {', '.join(LORA_KEYS)}")
    r = int(lora.get("r", 16))
    targets = lora.get(
        "target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj"]
    )
    config = LoraConfig(
        r=r,
        lora_alpha=float(lora.get("alpha", 2 * r)),
        lora_dropout=float(lora.get("dropout", 0.05)),
        target_modules=targets,
        use_dora=bool(lora.get("use_dora", False)),
        init_lora_weights=lora.get("init", True),
    )
    try:
        model.backbone.model = get_peft_model(model.backbone.model, config)
    except ValueError as e:
        raise ConfigError("train.lora.target_modules", f"{targets!r} matches no module of the backbone ({e})") from None


def merge_lora(model: nn.Module) -> None:
    """Fold LoRA adapters into the backbone weights in place (export); a no-op without LoRA."""
    from_peft = getattr(model.backbone.model, "merge_and_unload", None)
    if from_peft is not None:
        model.backbone.model = from_peft()


def prepare_model(model: nn.Module, cfg: TrainCfg) -> None:
    """Apply ``train.freeze``, ``train.lora`` and ``train.gradient_checkpointing`` to ``model``."""
    if cfg.lora:
        apply_lora(model, cfg.lora)
    for slot in cfg.freeze:
        module = getattr(model, slot, None)
        if slot == "vision" and model.visual is not None:
            module = model.visual.tower  # the encoder, or a native VLM's own tower (Qwen ``visual``, LLaVA's)
        if module is None:
            raise ConfigError("train.freeze", f"the model has no '{slot}' slot to freeze")
        module.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
        vision = getattr(model, "vision", None)
        inner = getattr(vision, "model", None)
        if inner is not None and hasattr(inner, "set_grad_checkpointing"):
            inner.set_grad_checkpointing(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("train.freeze", "every parameter is frozen; nothing would train")


def make_optimizer(module: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over the trainable parameters; no weight decay on biases, norms and scalars."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, cfg: TrainCfg) -> float:
    """Multiplier of ``train.lr`` at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainCfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

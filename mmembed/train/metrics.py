"""Run logging on rank 0: ``metrics.jsonl`` (one object per step), a tqdm bar, TensorBoard when
installed, and ``loss.png`` at the end.

Record kinds in ``metrics.jsonl``: a trained step (``step``, ``loss``, ``lr``, ...; ``eval/*`` scores or
``eval/error`` on evaluation steps) and a skipped step (``{"step", "skipped_step": true, "reason"}``, no
``loss``). Every record has ``step``, which the resume truncation relies on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "plot_loss"]


class MetricsLogger:
    """Appends one JSON object per step; on resume, drops entries past the resumed step first so the
    file reads like one uninterrupted run."""

    def __init__(self, output_dir: Path, start_step: int, max_steps: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step(ln) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step)
        except Exception:  # tensorboard not installed: JSONL only
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}"
            )
        if self.bar is not None and ("loss" in record or record.get("skipped_step")):
            self.bar.update(1)  # a skipped step is still a step of the schedule

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return -1


def plot_loss(metrics: Path, out: Path) -> Path | None:
    """Draw the training loss (and eval scores, if logged) from ``metrics.jsonl``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(ln) for ln in Path(metrics).read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, lw=1.2, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    evals = [(r["step"], r["eval/mean_hit@1"]) for r in rows if "eval/mean_hit@1" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label="held-out hit@1")
        ax2.set_ylabel("held-out hit@1")
        ax2.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out

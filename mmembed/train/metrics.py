"""Run logging on rank 0: ``metrics.jsonl`` (one object per step), progress on the console, TensorBoard when
installed, and ``loss.png`` (rewritten at every evaluation and at the end).

Record kinds in ``metrics.jsonl``: a trained step (``step``, ``loss``, ``lr``, ...; ``eval/*`` scores, with
``eval/<dataset>/chance`` beside each ``eval/<dataset>/hit@1``, or ``eval/error`` on evaluation steps) and a
skipped step (``{"step", "skipped_step": true, "reason"}``, no ``loss``). Every record has ``step``, which the
resume truncation relies on.

Console: on a terminal a tqdm bar (:class:`mmembed.progress.Progress`) updated every step with loss, lr and
samples/s; anywhere else (CI, ``nohup``, a cluster log) one plain line every ``train.log_every`` steps and at the
last one, with no carriage returns::

    step 20/600: loss 0.4123, lr 1.98e-03, 812.4 samples/s, ETA 1m05s

(loss: the mean over the steps since the previous line; lr: the last step's; samples/s: over those steps' compute,
evaluation and checkpoint time left out; ETA: from the wall time of this run so far, everything included).
``MMEMBED_PROGRESS=bar|lines|off`` forces a mode; messages (evaluations, skipped steps) print in every mode.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from mmembed.progress import Progress, format_eta, progress_mode

__all__ = ["MetricsLogger", "plot_loss", "loss_figure", "line_labels", "ema"]


class MetricsLogger:
    """Appends one JSON object per step and shows progress; on resume, drops entries past the resumed step first
    so the file reads like one uninterrupted run.

    Args:
        output_dir: the run folder (``metrics.jsonl``, ``tensorboard/``).
        start_step: steps already done (a resumed run).
        max_steps: ``train.max_steps``.
        enabled: False on ranks other than 0: nothing is written or shown.
        log_every: in ``lines`` mode, print a line every this many steps (``train.log_every``).
        stream: where progress and messages go (default stderr, where tqdm writes).
        mode: ``bar``, ``lines`` or ``off``; default from :func:`mmembed.progress.progress_mode`.
    """

    def __init__(
        self,
        output_dir: Path,
        start_step: int,
        max_steps: int,
        enabled: bool = True,
        *,
        log_every: int = 1,
        stream: IO[str] | None = None,
        mode: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.max_steps, self.start_step, self.log_every = max_steps, start_step, max(1, int(log_every))
        self.stream = stream if stream is not None else sys.stderr
        self.mode = (mode or progress_mode(self.stream)) if enabled else "off"
        self.bar: Progress | None = None
        self.tb: Any = None
        self.window: list[dict[str, Any]] = []  # records since the last plain line
        self.start = time.perf_counter()
        if not enabled:
            return
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step(ln) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if self.mode == "bar":
            self.bar = Progress(max_steps, "train", "step", initial=start_step, stream=self.stream, mode="bar")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step)
        except Exception:  # tensorboard not installed: JSONL only
            self.tb = None

    def log(self, record: dict[str, Any], show: bool = True) -> None:
        """Append ``record`` (a trained or skipped step) and, with ``show``, advance the progress display
        (the loop shows a step as soon as it is trained, before its checkpoint and evaluation, and logs it after
        them with ``show=False``, so the step line comes before that step's evaluation line)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        if show:
            self.show(record)

    def show(self, record: dict[str, Any]) -> None:
        """Advance the bar, or print the plain line when ``record`` ends a ``log_every`` window."""
        if not self.enabled or ("loss" not in record and not record.get("skipped_step")):
            return
        # a skipped step is still a step of the schedule
        if self.bar is not None:
            if "loss" in record:  # set without a refresh: the update below redraws once per step
                self.bar.set_postfix(
                    f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, {record['samples_per_s']:.1f} samples/s"
                )
            self.bar.update(1)
        elif self.mode == "lines":
            self.window.append(record)
            step = int(record["step"])
            if step % self.log_every == 0 or step >= self.max_steps:
                print(self.line(step), file=self.stream, flush=True)
                self.window = []

    def line(self, step: int) -> str:
        """The plain progress line for ``step`` over the records since the previous line."""
        trained = [r for r in self.window if "loss" in r]
        if trained:
            loss = f"loss {sum(r['loss'] for r in trained) / len(trained):.4f}"
            lr = f"lr {trained[-1]['lr']:.2e}"
            # the same number of samples every step: the window's rate is the harmonic mean of the step rates
            inv = [1.0 / r["samples_per_s"] for r in trained if r.get("samples_per_s")]
            sps = f"{len(inv) / sum(inv):.1f} samples/s" if inv and sum(inv) > 0 else "? samples/s"
            fields = [loss, lr, sps]
        else:
            fields = [f"no trained step since the last line ({len(self.window)} skipped)"]
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start
        eta = format_eta((self.max_steps - step) * elapsed / done) if done > 0 else "?"
        return f"step {step}/{self.max_steps}: {', '.join(fields)}, ETA {eta}"

    def message(self, text: str) -> None:
        """A line that does not break the bar; shown in every mode (it says something happened)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return -1


# ----------------------------------------------------------------------------------------------
# loss.png


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction (the first points are not pulled to 0)."""
    out, m = [], 0.0
    for i, v in enumerate(values, 1):
        m = weight * m + (1 - weight) * v
        out.append(m / (1 - weight**i) if weight > 0 else v)
    return out


def _eval_tasks(rows: list[dict[str, Any]]) -> list[str]:
    """Datasets with a ``eval/<name>/hit@1`` curve, in first-seen order (``eval/select/...`` is the selection)."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.startswith("eval/") and k.endswith("/hit@1") and not k.startswith("eval/select/"):
                names.setdefault(k[len("eval/") : -len("/hit@1")], None)
    return list(names)


def loss_figure(rows: list[dict[str, Any]], title: str | None = None) -> Any:
    """The ``loss.png`` figure from ``metrics.jsonl`` records; None without matplotlib or without a trained step.

    Top: the raw train loss, its EMA (``smoothed``) and the learning rate on a second axis. Bottom (when
    evaluations were logged): each eval task's hit@1 with its chance level dashed in the same colour.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to manage
    except ImportError:
        return None
    trained = [r for r in rows if "loss" in r and isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"])]
    if not trained:
        return None
    steps = [r["step"] for r in trained]
    losses = [float(r["loss"]) for r in trained]
    tasks = _eval_tasks(rows)
    fig = Figure(figsize=(7, 6 if tasks else 3.8), dpi=110)
    axes = fig.subplots(2 if tasks else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    # a window of about a twentieth of the run, at most ~50 steps; runs under 20 steps are shown raw
    weight = min(0.98, max(0.0, 1.0 - 20.0 / len(losses)))
    ax.plot(steps, losses, lw=0.8, alpha=0.35, color="tab:blue", label="train loss")
    ax.plot(steps, ema(losses, weight), lw=1.6, color="tab:blue", label="smoothed")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    lr_rows = [r for r in trained if isinstance(r.get("lr"), (int, float))]
    handles, labels = ax.get_legend_handles_labels()
    if lr_rows:
        ax_lr = ax.twinx()
        ax_lr.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], ls=":", color="tab:gray", label="lr")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        h, lab = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, loc="upper right", fontsize=7)
    if tasks:
        ax_e = axes[1]
        colors = [f"C{i % 10}" for i in range(len(tasks))]
        for name, color in zip(tasks, colors):
            pts = [(r["step"], r[f"eval/{name}/hit@1"]) for r in rows if f"eval/{name}/hit@1" in r]
            ax_e.plot(*zip(*pts), "o-", ms=3, lw=1.2, color=color, label=f"{name} hit@1")
            chance = [r[f"eval/{name}/chance"] for r in rows if f"eval/{name}/chance" in r]
            if chance:
                ax_e.axhline(chance[-1], ls="--", lw=0.9, color=color, label=f"{name} chance")
        ax_e.set_ylim(0, 1.02)
        ax_e.set_ylabel("held-out hit@1")
        ax_e.grid(alpha=0.3)
        ax_e.legend(loc="best", fontsize=7, ncol=2 if len(tasks) > 3 else 1)
    axes[-1].set_xlabel("step")
    fig.suptitle(title or "training", fontsize=10)
    fig.tight_layout()
    return fig


def line_labels(fig: Any) -> list[str]:
    """The labels of every line drawn on ``fig`` (for tests and quick checks)."""
    return [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]


def plot_loss(metrics: Path, out: Path, title: str | None = None) -> Path | None:
    """Draw :func:`loss_figure` from ``metrics.jsonl`` into ``out`` (atomically: a kill mid-write keeps the last
    plot); None without matplotlib or without a trained step."""
    rows = []
    for ln in Path(metrics).read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except ValueError:  # a line cut by a kill: the plot still shows the rest
            continue
    fig = loss_figure(rows, title=title or f"run {Path(metrics).parent.name}")
    if fig is None:
        return None
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

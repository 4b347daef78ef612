"""Metric writers (JSONL, TensorBoard without TensorFlow, optional Weights & Biases) and plots."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


def tensorboard_tag(name: str) -> str:
    """`name` with every character TensorBoard rejects (outside `[-/\\w.]`) replaced by `_`.

    TensorBoard renames such tags itself but logs a warning on every write, e.g. for
    the per-reward metric `reward/gym:chain_sum`.
    """
    return re.sub(r"[^-/\w.]", "_", name)


def _eval_only(row: Mapping[str, Any]) -> bool:
    return all(k == "step" or k.startswith("eval/") for k in row)


def keep_through(step: int) -> Callable[[Mapping[str, Any]], bool]:
    """Which logged rows a run resumed from a checkpoint at `step` keeps.

    Everything logged up to the checkpoint was logged once: the rows of earlier steps
    and the training row of `step` itself (written before it was saved). An eval-only
    row at `step` (a final eval) is dropped, since the resumed run evaluates again; the
    initial eval at step 0 is kept, since it does not. With `step` < 0 (no checkpoint:
    the run starts over) nothing is kept.
    """

    def keep(row: Mapping[str, Any]) -> bool:
        at = row.get("step", 0)
        if step < 0:
            return False
        if at == 0 and _eval_only(row):
            return True
        return at < step or (at == step and not _eval_only(row))

    return keep


def replace_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and `os.replace`.

    A reader, or a run killed mid-write, finds the old file or the new one, never a torn one.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rewrite_rows(path: str | os.PathLike, keep: Callable[[Mapping[str, Any]], bool]) -> int:
    """Keep only the JSONL rows for which `keep(row)` holds, replacing the file atomically.

    Returns the number of rows dropped (0 when the file does not exist). A torn last
    line (a process killed mid-write) is dropped too.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
        if row is not None and keep(row):
            kept.append(line)
        elif line.strip():
            dropped += 1
    replace_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl`, TensorBoard event files and W&B.

    TensorBoard files go to `workdir/tensorboard` (written by tensorboardX, no
    TensorFlow needed). W&B is used only when `wandb_project` is set and the
    package is installed (set WANDB_MODE=offline to log without a network).
    Pass `enabled=False` on every process but the first.

    `resume_step`: the step a resumed run continues from (-1: it starts over). The
    JSONL files then keep only what `keep_through(resume_step)` keeps, and TensorBoard
    hides the events of later steps (tensorboardX's `purge_step`), so each step is
    logged once however often the run was interrupted. None: append to whatever is there.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        purge_step = None
        if resume_step is not None:
            for name in (METRICS_FILE, SAMPLES_FILE):
                dropped = rewrite_rows(self.workdir / name, keep_through(resume_step))
                if dropped:
                    logger.info("%s: dropped %d rows after step %d", name, dropped, resume_step)
            if (self.workdir / "tensorboard").exists():
                purge_step = resume_step + 1  # 0 when starting over: hide every event
        self._jsonl = open(self.workdir / METRICS_FILE, "a")
        self._samples = open(self.workdir / SAMPLES_FILE, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge_step)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning("wandb_project=%r but wandb is not installed.", wandb_project)
            else:
                self._wandb = wandb.init(
                    project=wandb_project,
                    name=run_name,
                    dir=str(self.workdir),
                    config=dict(config or {}),
                    resume="allow",
                )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One row of scalars at `step` (non-finite values are written as null in JSON)."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in scalars.items()}
        finite = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        row = {"step": int(step), **finite}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(tensorboard_tag(name), value, int(step))
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        """A few sample completions (prompt, completion, reward, ...) for reading."""
        if not self.enabled or not samples:
            return
        for sample in samples:
            self._samples.write(json.dumps({"step": int(step), **sample}) + "\n")
        self._samples.flush()
        if self._tb is not None:
            text = "\n\n".join(
                f"**reward {s.get('reward', '')}** `{s.get('prompt', '')}`"
                f" → `{s.get('completion', '')}`"
                for s in samples
            )
            self._tb.add_text("samples", text, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file (a directory means its metrics.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    out_path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """One panel per metric against step, saved as a PNG. Missing keys are skipped.

    Drawn on a `Figure` with its own Agg canvas, not through pyplot, so that the caller's
    matplotlib backend (a notebook's inline one) stays as it was.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        raise ValueError(f"none of the metrics to plot were logged: {list(keys)}")
    fig = Figure(figsize=(4.5 * len(keys), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path


SUMMARY_FILE = "summary.json"
# The panels of `training.png`, the overview plot of a run.
OVERVIEW_KEYS = ("reward_mean", "eval/accuracy", "zero_std_group_frac", "completion_len_mean")


def write_summary(
    workdir: str | os.PathLike, summary: Mapping[str, Any], *, title: str
) -> dict[str, Any]:
    """Complete a run's summary from its metrics.jsonl, draw its plots, write summary.json.

    Adds the first and last logged `reward_mean` and the names of the PNG plots
    (`reward_mean.png`, `eval_accuracy.png` and the overview `training.png`).
    Returns the summary as written.
    """
    workdir = Path(workdir)
    summary = dict(summary)
    rows = read_metrics(workdir)
    rewards_seen = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
    if rewards_seen:
        summary["reward_mean_first"] = rewards_seen[0]
        summary["reward_mean_last"] = rewards_seen[-1]
    plots = []
    for key in ("reward_mean", "eval/accuracy"):
        if any(r.get(key) is not None for r in rows):
            name = key.replace("/", "_") + ".png"
            plot_metrics(rows, [key], workdir / name, title=title)
            plots.append(name)
    plot_metrics(rows, OVERVIEW_KEYS, workdir / "training.png", title=title)
    summary["plots"] = [*plots, "training.png"]
    replace_text(workdir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary

"""A run's record: metrics.jsonl (one JSON object per evaluation) and loss.png."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..fsutil import atomic_path


def perplexity(loss: float | None) -> float | None:
    """exp(loss), capped so a diverged run does not overflow; None for no loss."""
    return None if loss is None else math.exp(min(loss, 700.0))


class MetricsLog:
    """metrics.jsonl: one JSON object per evaluation, appended and flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict]:
        rows = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return rows
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut off by a kill, and anything after it
        return rows

    def truncate(self, last_step: int) -> list[dict]:
        """Drop the rows after `last_step` (written after the checkpoint being resumed); the file is rewritten
        only when something is dropped."""
        rows = self.rows()
        keep = [r for r in rows if r.get("step", -1) <= last_step]
        if keep != rows or (self.path.exists() and len(rows) != self._line_count()):
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        return keep

    def _line_count(self) -> int:
        return sum(1 for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip())

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def plot_losses(rows: Sequence[dict], path: Path) -> bool:
    """Write train/validation loss against tokens seen as a PNG; False when matplotlib is not installed."""
    return plot_curves(rows, path, {"train_loss": "train", "val_loss": "validation"}, "tokens_seen", "loss")


def plot_curves(rows: Sequence[dict], path: Path, series: dict[str, str], x: str, ylabel: str) -> bool:
    """Write the row fields `series` ({key: legend label}) against field `x` as a PNG; False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # an optional extra: gpt2load[plot]
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in series.items():
        pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and r.get(x) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return True


__all__ = ["MetricsLog", "perplexity", "plot_curves", "plot_losses"]

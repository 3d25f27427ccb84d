"""Small PNG plots (matplotlib, Agg backend: no display needed), written atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

from .atomic import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; a no-op when a backend is already in use
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (noisy per-step losses read better smoothed)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def save_loss_curve(history: dict[str, Sequence[Sequence[float]]], path: str | os.PathLike, *, title: str = "loss") -> Path:
    """Plot ``history`` (``{"train": [[step, loss], ...], "val": [[step, loss], ...]}``) to a PNG at ``path``.

    Train loss is drawn raw (faint) and smoothed; validation loss as markers. Returns ``path``.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        train = list(history.get("train") or [])
        if train:
            steps = [s for s, _ in train]
            losses = [v for _, v in train]
            ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1)
            window = max(1, len(losses) // 20)
            ax.plot(steps, _smooth(losses, window), color="tab:blue", linewidth=2,
                    label=f"train (avg of {window})" if window > 1 else "train")
        val = list(history.get("val") or [])
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:orange", label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (answer tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
        return _write_png(fig, path)
    finally:
        plt.close(fig)


def save_line_plot(series: dict[str, Sequence[Sequence[float]]], path: str | os.PathLike, *, title: str = "",
                   xlabel: str = "", ylabel: str = "") -> Path:
    """Generic helper for others: ``{"label": [[x, y], ...]}`` as lines in one PNG."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for label, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend()
        return _write_png(fig, path)
    finally:
        plt.close(fig)


def _write_png(fig, path: str | os.PathLike) -> Path:
    """Render ``fig`` to PNG bytes and write them atomically (no half-written image on a crash)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)

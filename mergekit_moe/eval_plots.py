"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

* ``routing_heatmap``: one panel per expert; rows = tasks, columns = decoder layers, colour = the
  mean mixture weight that expert gets on that task's rows at that layer.
* ``task_scores_plot``: the primary score per task (bars), labelled with its metric.
* ``comparison_plot``: per-task scores of several targets side by side (benchmarks).
"""

from __future__ import annotations

import os
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def routing_heatmap(routing: dict[str, Any], path: str | os.PathLike) -> None:
    """``routing`` as in scores.json: experts, layers, mean_weight[task] = (layers, experts) list."""
    plt = _plt()
    experts, layers = routing["experts"], routing["layers"]
    tasks = sorted(routing["mean_weight"])
    n = len(experts)
    ncols = min(n, 3)  # wide models (30 layers) x many experts: wrap panels into rows
    nrows = -(-n // ncols)
    panel_w = max(3.0, min(6.0, 0.2 * len(layers) + 1.5))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 1.0, (0.4 * len(tasks) + 1.4) * nrows + 0.6),
                             squeeze=False, constrained_layout=True)
    im = None
    step = max(1, len(layers) // 12)  # at most ~12 layer labels per panel
    for k in range(nrows * ncols):
        ax = axes[k // ncols][k % ncols]
        if k >= n:
            ax.axis("off")
            continue
        grid = [[routing["mean_weight"][t][li][k] for li in range(len(layers))] for t in tasks]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"expert: {experts[k]}", fontsize=9)
        ax.set_xticks(range(0, len(layers), step), [str(L) for L in layers[::step]], fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks if k % ncols == 0 else [""] * len(tasks), fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="mean mixture weight")
    acc = routing.get("accuracy")
    fig.suptitle("routing weight per task and layer" + (f" (routing accuracy {acc:.2f})" if acc is not None else ""),
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_scores_plot(tasks: dict[str, dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> None:
    """Bar chart of each task's primary score (0..1) with its metric name."""
    plt = _plt()
    names = [t for t, v in tasks.items() if v.get("score") is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1), 3.2), constrained_layout=True)
    vals = [tasks[t]["score"] for t in names]
    bars = ax.bar(range(len(names)), vals, color="#4c72b0")
    for b, t, v in zip(bars, names, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}\n{tasks[t]['metric']}", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("score")
    ax.set_title(title or "task scores", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_plot(results: dict[str, dict[str, float | None]], path: str | os.PathLike, *, title: str = "") -> None:
    """Grouped bars: ``results[system][task] = score`` (None = not applicable)."""
    plt = _plt()
    systems = list(results)
    tasks = sorted({t for r in results.values() for t in r})
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(tasks) + 2), 3.6), constrained_layout=True)
    for i, s in enumerate(systems):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [results[s].get(t) or 0.0 for t in tasks], width, label=s)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "scores by system", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)

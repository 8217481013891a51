"""PNG plots beside the tables: confusion matrices and per-run metric curves (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import os

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # headless: CI and cluster nodes have no display
    import matplotlib.pyplot as plt
    return plt


def plot_confusion(confusion, path: str, *, class_names: list[str] | None = None, title: str = "confusion matrix",
                   normalize: bool = True) -> str:
    """Rows = true class, columns = predicted; cells coloured by row share (recall), annotated with counts."""
    plt = _pyplot()
    cm = np.asarray(confusion.cpu() if hasattr(confusion, "cpu") else confusion, dtype=np.float64)
    c = cm.shape[0]
    shade = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    names = class_names or [str(i) for i in range(c)]
    size = max(4.0, 0.5 * c + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(shade, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class" if normalize else "count")
    if c <= 30:  # past that the labels overlap and the numbers are unreadable anyway
        ax.set_xticks(range(c), names, rotation=90 if c > 10 else 0)
        ax.set_yticks(range(c), names)
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if shade[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dirs: list[str], path: str, *, metrics: tuple[str, ...] | None = None,
                labels: list[str] | None = None) -> str | None:
    """One panel per metric (train loss and every val_* the runs logged), one line per run."""
    runs = [(labels[i] if labels else os.path.basename(os.path.normpath(d)), read_metrics(d))
            for i, d in enumerate(run_dirs)]
    runs = [(name, rows) for name, rows in runs if rows]
    if not runs:
        return None
    if metrics is None:
        found = {k for _, rows in runs for r in rows for k in r if k.startswith("val_")}
        metrics = ("loss",) + tuple(sorted(found, key=lambda k: (k != "val_loss", k)))[:5]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, key in zip(axes[0], metrics):
        for name, rows in runs:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("val_") else None, markersize=3, label=name)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    if len(runs) <= 12:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

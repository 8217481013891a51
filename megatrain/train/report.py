"""report.png: loss (train and validation), learning rate, throughput (with MFU where logged) and peak memory
curves from metrics.jsonl."""
from __future__ import annotations

import json
import os


def read_metrics(log_dir: str) -> list[dict]:
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_report(log_dir: str) -> str | None:
    rows = read_metrics(log_dir)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    axes[0].plot(steps, [r["loss"] for r in rows], label="train")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        axes[0].plot(*zip(*val), "o-", label="validation")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in rows])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot(steps, [r["tokens_per_s"] for r in rows])
    axes[2].set(title="throughput (items/s)", xlabel="step")
    mfu = [(r["step"], 100 * r["mfu"]) for r in rows if "mfu" in r]
    if mfu:  # MFU on a twin axis: same curve shape as throughput, its own scale
        twin = axes[2].twinx()
        twin.plot(*zip(*mfu), color="tab:orange")
        twin.set_ylabel("MFU (%)", color="tab:orange")
    mem = [(r["step"], r["peak_mem_gib"]) for r in rows if "peak_mem_gib" in r]
    if mem:
        axes[3].plot(*zip(*mem))
    axes[3].set(title="peak memory (GiB)", xlabel="step")
    fig.tight_layout()
    out = os.path.join(log_dir, "report.png")
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out

"""Plots people expect from few-shot papers: accuracy vs shots, reliability diagram (matplotlib, optional)."""
from __future__ import annotations

from pathlib import Path

import torch

from .metrics import expected_calibration_error, reliability_bins


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'clip-promptkit[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_shots(runs: dict, path, title: str = "Accuracy vs shots") -> Path:
    """`runs`: method -> {shots: top-1 %}. Writes a PNG with one line per method, log2 shots axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
    for method, curve in runs.items():
        shots = sorted(int(k) for k in curve)
        ax.plot(shots, [curve[k] if k in curve else curve[str(k)] for k in shots], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_reliability(logits: torch.Tensor, labels: torch.Tensor, path, n_bins: int = 15, title: str | None = None) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the ECE."""
    plt = _pyplot()
    probs = logits.detach().float().cpu().softmax(-1)
    labels = torch.as_tensor(labels).cpu()
    count, confidence, accuracy = reliability_bins(probs, labels, n_bins)
    centres = (torch.arange(n_bins) + 0.5) / n_bins
    fig, ax = plt.subplots(figsize=(3.8, 3.8), dpi=120)
    ax.bar(centres.tolist(), torch.where(count > 0, accuracy, torch.zeros_like(accuracy)).tolist(), width=1 / n_bins,
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ece = expected_calibration_error(probs, labels, n_bins)
    ax.set_title(f"{title + ': ' if title else ''}ECE {ece:.1f}%")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

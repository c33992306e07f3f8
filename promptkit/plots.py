"""Plots people expect from few-shot papers: accuracy vs shots, reliability diagram (PNG; matplotlib is the
optional `plots` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from .metrics import expected_calibration_error, reliability_bins


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'clip-promptkit[plots]'") from err
    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_accuracy_vs_shots(runs: Mapping[str, Mapping], path, title: str = "Accuracy vs shots") -> Path:
    """One line per method over a log2 shots axis.

    Args:
        runs: method -> {shots: top-1 %}; shots may be ints or strings (as read back from JSON).
        path: PNG to write (parent folders are created).
        title: figure title.

    Returns:
        `path`.
    """
    if not runs or not all(runs.values()):
        raise ValueError("plot_accuracy_vs_shots needs at least one method with at least one (shots, top1) point")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
    all_shots = set()
    for method, curve in runs.items():
        points = sorted((int(shots), float(top1)) for shots, top1 in curve.items())
        ax.plot([s for s, _ in points], [a for _, a in points], marker="o", label=method)
        all_shots.update(s for s, _ in points)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_shots), [str(s) for s in sorted(all_shots)])  # 1 2 4 8 16, not 2^0 ... 2^4
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


def plot_reliability(logits: torch.Tensor, labels: torch.Tensor, path, n_bins: int = 15,
                     title: str | None = None) -> Path:
    """Reliability diagram: accuracy per equal-width confidence bin against the diagonal, ECE in the title.

    Args:
        logits: [N, C] scores.
        labels: [N] true labels.
        path: PNG to write (parent folders are created).
        n_bins: confidence bins.
        title: prefix of the title.

    Returns:
        `path`.
    """
    probs = logits.detach().float().cpu().softmax(-1)
    labels = torch.as_tensor(labels).cpu()
    _, confidence, accuracy = reliability_bins(probs, labels, n_bins)
    plt = _pyplot()
    centres = ((torch.arange(n_bins) + 0.5) / n_bins).tolist()
    fig, ax = plt.subplots(figsize=(3.8, 3.8), dpi=120)
    ax.bar(centres, accuracy.tolist(), width=1 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.bar(centres, (confidence - accuracy).tolist(), bottom=accuracy.tolist(), width=1 / n_bins,
           color="tab:red", alpha=0.3, hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ece = expected_calibration_error(probs, labels, n_bins)
    ax.set_title(f"{title + ': ' if title else ''}ECE {ece:.1f}%")
    ax.legend(loc="upper left")
    return _save(fig, plt, path)

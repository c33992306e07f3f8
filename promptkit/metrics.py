"""Classification metrics on logits: accuracy, top-5, macro-F1, per-class accuracy, calibration (vectorised torch)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _check(scores: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"{what} must be [N, C] and labels [N]; got {tuple(scores.shape)} and {tuple(labels.shape)}")
    n, n_classes = scores.shape
    if n == 0:
        raise ValueError("no samples to evaluate")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}) for {n_classes} classes, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if scores.isnan().any():
        raise ValueError(f"{what} contain NaN; the model diverged or its inputs are broken")


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15):
    """Equal-width confidence bins (lower, upper], the convention of Guo et al. and C-TPT.

    Args:
        probs: [N, C] class probabilities.
        labels: [N] true labels.
        n_bins: number of bins on [0, 1].

    Returns:
        (count, mean confidence, accuracy), each [n_bins]; confidence and accuracy are 0 in empty bins.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    labels = torch.as_tensor(labels, device=probs.device).long()
    _check(probs, labels, "probabilities")
    confidence, predictions = probs.max(dim=1)
    correct = (predictions == labels).to(probs.dtype)
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)[1:-1]
    bins = torch.bucketize(confidence, inner_edges)  # edge[i-1] < confidence <= edge[i]
    zeros = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device)
    count = zeros.index_add(0, bins, torch.ones_like(confidence))
    safe = count.clamp(min=1)
    return count, zeros.index_add(0, bins, confidence) / safe, zeros.index_add(0, bins, correct) / safe


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE in percent: the sum over equal-width confidence bins of |accuracy - mean confidence|, weighted by
    the bin's share of samples."""
    count, confidence, accuracy = reliability_bins(probs, labels, n_bins)
    return 100 * float((count / count.sum() * (accuracy - confidence).abs()).sum())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15,
                           classnames: Sequence[str] | None = None, groups=None) -> dict:
    """All the numbers of a few-shot evaluation, from logits.

    Args:
        logits: [N, C] scores (any scale; softmax gives the probabilities used for `ece` and `nll`).
        labels: [N] true labels in [0, C).
        n_bins: confidence bins for `ece`.
        classnames: C names; when given, `per_class` maps name -> accuracy.
        groups: [N] integer group of each sample (e.g. Waterbirds' class x background); when given, also
            `per_group` (group -> accuracy) and `worst_group` (the lowest of them), in percent.

    Returns:
        `top1`, `top5` (top-min(5, C)), `macro_f1` (as scikit-learn's `f1_score(average="macro")`: over the
        labels that occur in `labels` or the predictions), `per_class` accuracy (a list, or a dict by class
        name; None for a class without samples), `ece`, all in percent; `nll` (mean cross-entropy) and `n`.

    Raises:
        ValueError: malformed logits or labels, or `groups` not one integer per sample.
    """
    logits = logits.detach().float().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    _check(logits, labels, "logits")
    n, n_classes = logits.shape
    if classnames is not None and len(classnames) != n_classes:
        raise ValueError(f"{len(classnames)} classnames for logits over {n_classes} classes")
    predictions = logits.argmax(dim=1)
    correct = predictions == labels
    in_top5 = (logits.topk(min(5, n_classes), dim=1).indices == labels[:, None]).any(dim=1)
    support = torch.bincount(labels, minlength=n_classes).float()
    predicted = torch.bincount(predictions, minlength=n_classes).float()
    true_positive = torch.bincount(labels[correct], minlength=n_classes).float()
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)  # = 2TP / (2TP + FP + FN)
    occurring = (support > 0) | (predicted > 0)
    accuracy = (100 * true_positive / support.clamp(min=1)).tolist()
    # None, not NaN, for classes without samples: the metrics go to JSON lines, where NaN is invalid.
    per_class = [acc if count > 0 else None for acc, count in zip(accuracy, support.tolist())]
    metrics = {
        "top1": 100 * correct.float().mean().item(),
        "top5": 100 * in_top5.float().mean().item(),
        "macro_f1": 100 * f1[occurring].mean().item(),
        "per_class": dict(zip(classnames, per_class)) if classnames is not None else per_class,
        "ece": expected_calibration_error(logits.softmax(dim=1), labels, n_bins),
        "nll": F.cross_entropy(logits, labels).item(),
        "n": n,
    }
    if groups is not None:
        groups = torch.as_tensor(groups).cpu()
        if groups.shape != labels.shape or groups.is_floating_point() or groups.is_complex():
            raise ValueError(f"groups must hold one integer group per sample: {n} samples, got "
                             f"{tuple(groups.shape)} of {groups.dtype}")
        per_group = {int(g): 100 * correct[groups == g].float().mean().item() for g in groups.unique()}
        metrics.update(per_group=per_group, worst_group=min(per_group.values()))
    return metrics

"""Classification metrics on logits: accuracy, top-5, macro-F1, per-class accuracy, calibration."""
from __future__ import annotations

import torch


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15):
    """Per equal-width confidence bin: (count, mean confidence, accuracy), each [n_bins]."""
    confidence, predictions = probs.max(dim=1)
    correct = (predictions == labels).float()
    bins = torch.clamp((confidence * n_bins).ceil().long() - 1, 0, n_bins - 1)
    count = torch.zeros(n_bins).index_add_(0, bins, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins).index_add_(0, bins, confidence)
    correct_sum = torch.zeros(n_bins).index_add_(0, bins, correct)
    safe = count.clamp(min=1)
    return count, conf_sum / safe, correct_sum / safe


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE in percent: sum over bins of |accuracy - confidence| weighted by the bin's share of samples."""
    count, confidence, accuracy = reliability_bins(probs, labels, n_bins)
    return 100 * float((count / count.sum() * (accuracy - confidence).abs()).sum())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """`top1`, `top5`, `macro_f1`, `ece` (percent), `nll`, `per_class` accuracy (percent, one per class), `n`."""
    logits, labels = logits.detach().float().cpu(), torch.as_tensor(labels).long().cpu()
    n, n_classes = logits.shape
    if n == 0:
        raise ValueError("no samples to evaluate")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}) for {n_classes} classes, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    predictions = logits.argmax(dim=1)
    correct = (predictions == labels).float()
    top5 = (logits.topk(min(5, n_classes), dim=1).indices == labels[:, None]).any(dim=1).float()
    support = torch.bincount(labels, minlength=n_classes).float()
    predicted = torch.bincount(predictions, minlength=n_classes).float()
    true_positive = torch.bincount(labels[correct.bool()], minlength=n_classes).float()
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)
    present = support > 0
    per_class = torch.where(present, true_positive / support.clamp(min=1), torch.full_like(support, float("nan")))
    probs = logits.softmax(dim=1)
    return {
        "top1": 100 * correct.mean().item(),
        "top5": 100 * top5.mean().item(),
        # Like scikit-learn's f1_score(average="macro") over the labels that occur in either vector.
        "macro_f1": 100 * f1[present | (predicted > 0)].mean().item(),
        "per_class": (100 * per_class).tolist(),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": torch.nn.functional.cross_entropy(logits, labels).item(),
        "n": n,
    }

import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score, top_k_accuracy_score

from promptkit.metrics import classification_metrics, expected_calibration_error, reliability_bins


def naive_ece(probs, labels, n_bins):
    """Guo et al.'s loop over bins (lower, upper], as in the TPT/C-TPT evaluation code."""
    confidence, predictions = probs.max(dim=1)
    correct = (predictions == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            ece += in_bin.to(probs.dtype).mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return 100 * float(ece)


@pytest.mark.parametrize("n_classes, n", [(2, 40), (7, 200), (50, 300)])
def test_metrics_match_scikit_learn(n_classes, n):
    generator = torch.Generator().manual_seed(n_classes)
    labels = torch.randint(n_classes, (n,), generator=generator)
    # Informative logits so accuracy is neither 0 nor 100.
    logits = torch.randn(n, n_classes, generator=generator) + 2.0 * torch.nn.functional.one_hot(labels, n_classes)
    if n_classes > 2:  # one class neither present nor predicted, one predicted only, one present only
        neither, predicted_only, present_only = n_classes - 3, n_classes - 2, n_classes - 1
        labels[(labels == neither) | (labels == predicted_only)] = 0
        logits[:, [neither, present_only]] -= 8
        logits[:5, predicted_only] += 20
    metrics = classification_metrics(logits, labels)
    y, pred, scores = labels.numpy(), logits.argmax(1).numpy(), logits.double().softmax(1).numpy()
    if n_classes > 2:
        assert {neither, predicted_only}.isdisjoint(y) and present_only in y
        assert {neither, present_only}.isdisjoint(pred) and predicted_only in pred
    assert 0 < metrics["top1"] < 100
    assert metrics["top1"] == pytest.approx(100 * accuracy_score(y, pred), abs=1e-4)
    assert metrics["macro_f1"] == pytest.approx(100 * f1_score(y, pred, average="macro", zero_division=0), abs=1e-4)
    k = min(5, n_classes)
    top_k = top_k_accuracy_score(y, scores, k=k, labels=np.arange(n_classes)) if k < n_classes else 1.0
    assert metrics["top5"] == pytest.approx(100 * top_k, abs=1e-4)
    assert metrics["nll"] == pytest.approx(log_loss(y, scores, labels=np.arange(n_classes)), rel=1e-5)
    present = np.unique(y)
    recall = recall_score(y, pred, labels=present, average=None, zero_division=0)
    assert [metrics["per_class"][c] for c in present] == pytest.approx(list(100 * recall), abs=1e-4)
    absent = sorted(set(range(n_classes)) - set(present.tolist()))
    assert [metrics["per_class"][c] for c in absent] == [None] * len(absent)
    assert metrics["ece"] == pytest.approx(naive_ece(logits.softmax(1), labels, 15), abs=1e-4)
    assert metrics["n"] == n


def test_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1, 1])
    # 2 bins: (0.5, 1] holds all four: mean confidence .75, accuracy 3/4 -> ECE 0.
    assert expected_calibration_error(probs, labels, 2) == pytest.approx(0, abs=1e-5)
    # 10 bins: .9 right, .6 wrong, .7 right, .8 right, one per bin -> (.1 + .6 + .3 + .2) / 4.
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(30.0, abs=1e-4)
    # Through logits with a configurable bin count.
    assert classification_metrics(probs.log(), labels, n_bins=10)["ece"] == pytest.approx(30.0, abs=1e-4)


def test_reliability_bins_put_edges_in_the_lower_bin():
    # Confidences exactly on bin edges (in float32) belong to the bin they close: (lower, upper].
    confidence = torch.tensor([0.5, 0.6, 0.7, 1.0, 0.55])
    probs = torch.stack([confidence, 1 - confidence], dim=1)
    labels = torch.tensor([0, 0, 1, 0, 0])
    count, mean_confidence, accuracy = reliability_bins(probs, labels, 10)
    assert count.tolist() == [0, 0, 0, 0, 1, 2, 1, 0, 0, 1]
    assert mean_confidence[5].item() == pytest.approx(0.575) and accuracy.tolist()[4:7] == [1, 1, 0]
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(naive_ece(probs, labels, 10), abs=1e-5)
    # Every float32 edge of 15 bins (ceil(confidence * 15) gets 0.2, 0.4, ... wrong by one bin).
    edges = torch.linspace(0, 1, 16)[1:, None]
    probs = torch.cat([edges, (1 - edges).expand(15, 19) / 19], dim=1)  # 20 classes: the edge is the maximum
    count, _, _ = reliability_bins(probs, torch.zeros(15, dtype=torch.long), 15)
    assert count.tolist() == [1] * 15


def test_ece_any_dtype_matches_naive_loop():
    generator = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(500, 10, generator=generator, dtype=torch.float64)).softmax(1)
    labels = torch.randint(10, (500,), generator=generator)
    for n_bins in (1, 5, 15, 40):
        assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(naive_ece(probs, labels, n_bins),
                                                                                  abs=1e-9)


def test_per_class_by_name_and_bad_inputs():
    logits = torch.eye(3)[[0, 1, 2, 2]]
    metrics = classification_metrics(logits, torch.tensor([0, 1, 2, 1]), classnames=["cat", "dog", "car"])
    assert metrics["per_class"] == {"cat": 100.0, "dog": 50.0, "car": 100.0}
    with pytest.raises(ValueError, match="2 classnames for logits over 3 classes"):
        classification_metrics(logits, torch.tensor([0, 1, 2, 1]), classnames=["cat", "dog"])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        classification_metrics(logits, torch.tensor([0, 1, 3, 1]))
    with pytest.raises(ValueError, match="must be"):
        classification_metrics(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(torch.full((4, 3), float("nan")), torch.tensor([0, 1, 2, 1]))


def test_plots_write_pngs(tmp_path):
    from promptkit.plots import plot_accuracy_vs_shots, plot_reliability

    curve = plot_accuracy_vs_shots({"coop": {1: 40.0, 4: 55.0, 16: 70.0}, "zero-shot": {"1": 50.0, "16": 50.0}},
                                   tmp_path / "plots" / "shots.png")
    logits, labels = torch.randn(50, 5), torch.randint(5, (50,))
    diagram = plot_reliability(logits, labels, tmp_path / "rel.png", n_bins=10, title="coop")
    for path in (curve, diagram):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="at least one method"):
        plot_accuracy_vs_shots({}, tmp_path / "empty.png")


def test_plots_without_matplotlib_say_how_to_install(tmp_path, monkeypatch):
    from promptkit.plots import plot_accuracy_vs_shots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'clip-promptkit\[plots\]'"):
        plot_accuracy_vs_shots({"coop": {1: 40.0}}, tmp_path / "x.png")

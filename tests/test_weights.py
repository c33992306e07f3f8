"""Weight-space and output-space ensembles (WiSE-FT, soups, PAINT), debiasing, group metrics."""
import pytest
import torch

import promptkit


# -- group metrics ------------------------------------------------------------------------------------
def test_worst_group_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0], [2, 0], [0, 2], [0, 2], [2, 0], [0, 2]])  # predictions 0 0 1 1 0 1
    labels = torch.tensor([0, 1, 1, 1, 0, 0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # right: 1/2, 2/2, 1/2 -> worst 50
    metrics = promptkit.classification_metrics(logits, labels, groups=groups)
    assert metrics["per_group"] == {0: 50.0, 1: 100.0, 2: 50.0} and metrics["worst_group"] == 50.0
    assert "worst_group" not in promptkit.classification_metrics(logits, labels)
    with pytest.raises(ValueError, match="one integer group per sample: 6 samples, got \\(5,\\)"):
        promptkit.classification_metrics(logits, labels, groups=groups[:5])
    with pytest.raises(ValueError, match="one integer group per sample"):
        promptkit.classification_metrics(logits, labels, groups=groups.float())


def test_evaluate_passes_groups_through(vit_clip, classnames, images):
    learner = promptkit.create_learner("zeroshot", vit_clip, classnames)
    data = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2]))
    trainer = promptkit.PromptTrainer(learner, promptkit.TrainConfig(output_dir=None, progress=False, device="cpu"))
    metrics = trainer.evaluate(data, groups=[1, 0, 1])
    with torch.no_grad():
        expected = promptkit.classification_metrics(learner(images), torch.tensor([0, 1, 2]), groups=[1, 0, 1])
    assert metrics["per_group"] == expected["per_group"] and metrics["worst_group"] == expected["worst_group"]
    with pytest.raises(ValueError, match="one integer group per sample"):
        trainer.evaluate(data, groups=[0, 1])

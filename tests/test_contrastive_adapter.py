"""Contrastive adapters (Zhang & Ré, NeurIPS 2022): the loss by hand, the hard-negative sampling, group robustness."""
import math

import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit.metrics import classification_metrics
from promptkit.objectives.robust import ContrastiveAdapterLoss


def unit(n, dim, seed):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("text", [True, False])
def test_loss_by_hand(vit_clip, text):
    """Every bank sample is a candidate (large n_*), so the random draws only reorder: the loss is exact."""
    names = ["cat", "dog", "car"]
    learner = promptkit.create_learner("contrastive-adapter", vit_clip, names, seed=0, batch_norm=False, hidden_dim=8,
                                       temperature=0.5, n_positives=100, n_negatives=100, n_neighbours=100, text=text)
    bank, labels = unit(9, vit_clip.embed_dim, 1), torch.arange(9) % 3
    learner.fit(bank, labels)
    text_features, scale = learner.text_features(), float(vit_clip.logit_scale)
    correct = (bank @ text_features.t()).argmax(-1).eq(labels)
    batch, batch_labels = bank[:6], labels[:6]
    with torch.no_grad():
        out = learner.training_loss(batch_labels, image_features=batch)
        adapted = F.normalize(learner.embed(bank), dim=-1)
        total = 0.0
        for i in range(6):
            if correct[i]:
                continue  # only what zero-shot gets wrong is an anchor
            y, z = int(labels[i]), adapted[i]
            nearest = torch.argsort(bank @ bank[i], descending=True)[1:]  # the anchor itself left out
            negatives = [float(z @ adapted[j]) / 0.5 for j in nearest if labels[j] != y]
            positives = [float(z @ adapted[j]) / 0.5 for j in range(9) if labels[j] == y and correct[j]]
            if text:
                positives.insert(0, float(z @ text_features[y]) / 0.5)
                negatives += [float(z @ text_features[c]) / 0.5 for c in range(3) if c != y]
            if positives:
                terms = [-(p - math.log(math.exp(p) + sum(math.exp(n) for n in negatives))) for p in positives]
                total += sum(terms) / len(terms)
    assert (~correct[:6]).any()
    torch.testing.assert_close(out.terms["contrastive"], torch.tensor(total), atol=1e-4, rtol=1e-5)
    logits = scale * F.normalize(learner.embed(batch), dim=-1) @ text_features.t()
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=0)


def test_hard_negatives_are_the_nearest_wrong_class_samples():
    loss = ContrastiveAdapterLoss(n_negatives=2, n_neighbours=2, n_positives=1)
    # On a circle: the anchor at angle 0 (class 0); bank angles 0 (itself), 10, 20, 30, 60 degrees.
    angles = torch.tensor([0.0, 10.0, 20.0, 30.0, 60.0]) * math.pi / 180
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    bank_labels = torch.tensor([0, 1, 0, 1, 1])
    correct = torch.tensor([False, True, True, True, True])
    positives, positive_valid, negatives, negative_valid = loss.sample(bank[:1], torch.tensor([0]), bank,
                                                                       bank_labels, correct)
    assert sorted(negatives[0].tolist()) == [1, 2]  # the 2 nearest after the anchor itself
    assert dict(zip(negatives[0].tolist(), negative_valid[0].tolist())) == {1: True, 2: False}  # same class masked
    assert positives[0].tolist() == [2] and positive_valid[0].all()  # the only correct same-class sample
    wider = ContrastiveAdapterLoss(n_negatives=3, n_neighbours=3)
    _, _, negatives, valid = wider.sample(bank[:1], torch.tensor([0]), bank, bank_labels, correct)
    assert sorted(negatives[0][valid[0]].tolist()) == [1, 3]  # 60 degrees is not among the 3 nearest


def spurious_features(text, n, seed):
    """Two classes; zero-shot CLIP decides along c = t1 - t0, where a spurious attribute s moves the features more
    than the class does; the class also moves them along v, orthogonal to c. Groups (y, s) with s != y are small
    and zero-shot gets them all wrong."""
    dim = text.shape[1]
    c = F.normalize(text[1] - text[0], dim=0)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(99))
    v = F.normalize(v - (v @ c) * c, dim=0)
    g = torch.Generator().manual_seed(seed)
    features, labels, groups = [], [], []
    for y in range(2):
        for s in range(2):
            k = n if s == y else n // 5
            sign_y, sign_s = 2 * y - 1, 2 * s - 1
            x = text.mean(0) + (0.05 * sign_y + 0.2 * sign_s) * c + 0.3 * sign_y * v
            features.append(F.normalize(x + 0.4 / dim ** 0.5 * torch.randn(k, dim, generator=g), dim=-1))
            labels += [y] * k
            groups += [2 * y + s] * k
    return torch.cat(features), torch.tensor(labels), torch.tensor(groups)


def test_worst_group_accuracy_rises_over_zero_shot(vit_clip):
    names = ["cat", "dog"]
    learner = promptkit.create_learner("contrastive-adapter", vit_clip, names, seed=0)
    # The tiny random model's class texts are nearly parallel (cosine ~0.997); real CLIP's are further apart.
    text = unit(2, vit_clip.embed_dim, 5)
    learner._text_features = F.normalize(text + 0.5 * text.flip(0), dim=-1)
    train, labels, _ = spurious_features(learner.text_features(), 40, 0)
    test, test_labels, groups = spurious_features(learner.text_features(), 40, 1)
    with torch.no_grad():
        zero_shot = vit_clip.logit_scale * test @ learner.text_features().t()
        before = classification_metrics(zero_shot, test_labels, groups=groups)
    learner.fit(train, labels)
    optimizer = torch.optim.SGD(learner.prompt_parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-5)
    for epoch in range(20):
        for batch in torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch)).split(32):
            optimizer.zero_grad()
            learner.training_loss(labels[batch], image_features=train[batch]).loss.backward()
            optimizer.step()
    learner.eval()
    with torch.no_grad():
        after = classification_metrics(learner(image_features=test), test_labels, groups=groups)
    assert before["worst_group"] == 0.0
    assert after["worst_group"] > 80.0 and after["top1"] > before["top1"]


def test_the_objective_needs_the_adapter(vit_clip, classnames):
    with pytest.raises(ValueError, match="needs the contrastive-adapter learner"):
        promptkit.create_learner("coop", vit_clip, classnames, objectives=["contrastive-adapter"])

"""Feature-level learners (CLIP-Adapter, Tip-Adapter(-F), linear probe) and heads exported for plain open_clip."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

import promptkit
from promptkit.learners.heads import search_C
from promptkit.training import PromptTrainer, TrainConfig


def dataset(classnames, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.arange(n) % len(classnames)
    data = torch.utils.data.TensorDataset(images, labels)
    data.classnames, data.targets = list(classnames), labels.tolist()
    return data


def features(n, dim, seed):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_clip_adapter_with_a_zeroed_residual_path_is_zero_shot(vit_clip, classnames, images):
    adapter = promptkit.create_learner("clip-adapter", vit_clip, classnames, seed=0)
    zero_shot = promptkit.create_learner("zeroshot", vit_clip, classnames)
    with torch.no_grad():
        adapter.adapter[2].weight.zero_()
        torch.testing.assert_close(adapter(images), zero_shot(images), atol=1e-5, rtol=0)


def test_clip_adapter_matches_the_official_formula_on_unnormalised_features(vit_clip, classnames):
    adapter = promptkit.create_learner("clip-adapter", vit_clip, classnames, seed=0)
    raw = torch.randn(4, vit_clip.embed_dim) * 3  # the official adapter reads unnormalised features
    with torch.no_grad():
        mixed = 0.2 * adapter.adapter(raw) + 0.8 * raw
        expected = vit_clip.logit_scale * F.normalize(mixed, dim=-1) @ adapter.text_features().t()
        torch.testing.assert_close(adapter(image_features=F.normalize(raw, dim=-1)), expected, atol=1e-4, rtol=1e-5)


def test_clip_adapter_trains_on_the_trainers_cached_features(vit_clip, classnames, monkeypatch):
    adapter = promptkit.create_learner("clip-adapter", vit_clip, classnames, seed=0)
    calls = []
    original = adapter.training_loss

    def spy(labels, images=None, *, image_features=None):
        calls.append((images, image_features))
        return original(labels, images, image_features=image_features)

    monkeypatch.setattr(adapter, "training_loss", spy)
    before = adapter.adapter[0].weight.detach().clone()
    PromptTrainer(adapter, TrainConfig(epochs=2, batch_size=8, lr=1e-2, optimizer="adamw", warmup_epochs=0,
                                       progress=False, device="cpu")).fit(dataset(classnames))
    assert calls and all(images is None and feats is not None for images, feats in calls)
    assert not torch.equal(adapter.adapter[0].weight, before)


def test_tip_adapter_logits_by_hand(vit_clip, classnames):
    tip = promptkit.create_learner("tip-adapter", vit_clip, classnames, alpha=2.0, beta=5.0)
    keys, labels = features(3, vit_clip.embed_dim, 1), torch.tensor([0, 2, 2])
    image = features(1, vit_clip.embed_dim, 2)
    tip.fit(keys, labels)
    text, scale = tip.text_features(), float(vit_clip.logit_scale)
    expected = []
    for c in range(len(classnames)):
        cache = sum(float(torch.exp(-5.0 * (1 - image[0] @ keys[j]))) for j in range(3) if labels[j] == c)
        expected.append(scale * float(image[0] @ text[c]) + 2.0 * cache)
    with torch.no_grad():
        torch.testing.assert_close(tip(image_features=image)[0], torch.tensor(expected), atol=1e-4, rtol=1e-6)


def official_search(tip, val, labels):
    """Tip-Adapter's `search_hp`, transcribed (utils.py), with the learner's zero-shot logits for 100 * f @ W."""
    (scale_b, scale_a), (steps_b, steps_a) = tip.search_scale, tip.search_steps
    beta_list = [i * (scale_b - 0.1) / steps_b + 0.1 for i in range(steps_b)]
    alpha_list = [i * (scale_a - 0.1) / steps_a + 0.1 for i in range(steps_a)]
    best_acc, best_beta, best_alpha = 0, 0, 0
    clip_logits = float(tip.clip.logit_scale) * val @ tip.text_features().t()
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = val @ tip.cache_keys.t()
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ tip.cache_values
            acc = 100 * float((clip_logits + cache_logits * alpha).argmax(-1).eq(labels).float().mean())
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_alpha, best_beta


def test_tip_adapter_search_picks_the_best_pair(vit_clip, classnames):
    """Zero-shot misreads the validation images; the cache holds them with their labels, so the search must raise
    alpha until the cache wins, and pick what the official loop picks."""
    tip = promptkit.create_learner("tip-adapter", vit_clip, classnames, search_steps=(20, 10))
    val = features(12, vit_clip.embed_dim, 3)
    zero_shot = (float(vit_clip.logit_scale) * val @ tip.text_features().t()).argmax(-1)
    labels = (zero_shot + 1) % len(classnames)  # every zero-shot answer wrong
    with torch.no_grad():
        tip.fit(val, labels)
        alpha, beta = tip.search(val, labels)
        assert (alpha, beta) == pytest.approx(official_search(tip, val, labels))
        assert (float(tip.alpha), float(tip.beta)) == pytest.approx((alpha, beta))
        assert tip(image_features=val).argmax(-1).eq(labels).float().mean() > 0.5


def test_tip_adapter_is_built_by_the_trainer_and_reloads(vit_clip, classnames, images, tmp_path):
    tip = promptkit.create_learner("tip-adapter", vit_clip, classnames, search_steps=(10, 4))
    metrics = PromptTrainer(tip, TrainConfig(progress=False, device="cpu", output_dir=str(tmp_path))).fit(
        dataset(classnames), dataset(classnames, n=12, seed=1))
    assert tip.cache_keys.shape == (24, vit_clip.embed_dim) and "val_top1" in metrics
    loaded = promptkit.load_pretrained(tmp_path / "prompts", vit_clip)
    assert float(loaded.beta) == float(tip.beta) and float(loaded.alpha) == float(tip.alpha)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), tip(images), atol=0, rtol=0)


def test_tip_adapter_f_fine_tunes_the_keys_then_searches(vit_clip, classnames, monkeypatch):
    tip = promptkit.create_learner("tip-adapter-f", vit_clip, classnames, search_steps=(10, 4))
    searched = []
    monkeypatch.setattr(tip, "search", lambda f, y: searched.append(len(f)))
    PromptTrainer(tip, TrainConfig(epochs=2, batch_size=8, lr=1e-3, optimizer="adamw", warmup_epochs=0,
                                   progress=False, device="cpu")).fit(dataset(classnames), dataset(classnames, 12, 1))
    with torch.no_grad():
        start = F.normalize(vit_clip.encode_image(dataset(classnames).tensors[0]), dim=-1)
    assert isinstance(tip.cache_keys, torch.nn.Parameter) and not torch.allclose(tip.cache_keys, start)
    assert searched == [12]  # once, after the last epoch, on the validation features


def test_linear_probe_equals_scikit_learn(vit_clip, classnames):
    x, y = features(30, vit_clip.embed_dim, 4), torch.arange(30) % len(classnames)
    probe = promptkit.create_learner("linear-probe", vit_clip, classnames, C=0.3)
    probe.fit(x, y)
    reference = LogisticRegression(C=0.3, solver="lbfgs", max_iter=1000).fit(x.numpy(), y.numpy())
    with torch.no_grad():
        ours = probe(image_features=x)
    torch.testing.assert_close(ours, torch.as_tensor(reference.decision_function(x.numpy())).float(), atol=1e-5, rtol=0)
    assert float(probe.chosen_C) == 0.3


def test_linear_probe_searches_C_on_validation_and_reports_it(vit_clip, classnames, tmp_path, images):
    x, y = features(30, vit_clip.embed_dim, 4), torch.arange(30) % len(classnames)
    val_x, val_y = features(18, vit_clip.embed_dim, 5), torch.arange(18) % len(classnames)
    probe = promptkit.create_learner("linear-probe", vit_clip, classnames)
    with pytest.raises(ValueError, match="searches C on validation"):
        probe.fit(x, y)
    probe.fit(x, y, val_x, val_y)
    chosen = search_C(x.numpy(), y.numpy(), val_x.numpy(), val_y.numpy())
    assert float(probe.chosen_C) == pytest.approx(chosen)

    def accuracy(c):
        return LogisticRegression(C=c, max_iter=1000).fit(x.numpy(), y.numpy()).score(val_x.numpy(), val_y.numpy())

    assert accuracy(chosen) >= max(accuracy(10.0 ** e) for e in range(-6, 7, 2))  # refinement never loses
    probe.save_pretrained(tmp_path)
    loaded = promptkit.load_pretrained(tmp_path, vit_clip)
    assert float(loaded.chosen_C) == float(probe.chosen_C)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), probe(images), atol=0, rtol=0)


def test_linear_probe_with_two_classes_matches_predict_proba(vit_clip):
    x, y = features(10, vit_clip.embed_dim, 6), torch.arange(10) % 2
    probe = promptkit.create_learner("linear-probe", vit_clip, ["cat", "dog"], C=1.0)
    probe.fit(x, y)
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(x.numpy(), y.numpy())
    with torch.no_grad():
        torch.testing.assert_close(probe(image_features=x).softmax(-1),
                                   torch.as_tensor(reference.predict_proba(x.numpy())).float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["zeroshot", "coop", "kgcoop", "linear-probe"])
def test_exported_head_runs_with_plain_open_clip(name, vit_clip, classnames, images, tmp_path):
    learner = promptkit.create_learner(name, vit_clip, classnames, seed=0)
    if name == "linear-probe":
        learner.fit(features(12, vit_clip.embed_dim, 7), torch.arange(12) % len(classnames),
                    features(6, vit_clip.embed_dim, 8), torch.arange(6))
    learner.export_head(tmp_path)
    head, meta = load_file(str(tmp_path / "head.safetensors")), json.loads((tmp_path / "head.json").read_text())
    assert meta["classnames"] == learner.classnames and meta["base_model"]["arch"] == vit_clip.arch
    with torch.no_grad():
        plain = F.normalize(vit_clip.model.encode_image(images), dim=-1) @ head["weight"].t() + head["bias"]
        torch.testing.assert_close(plain, learner(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["cocoop", "vpt", "clip-adapter", "tip-adapter"])
def test_export_head_refuses_image_dependent_classifiers(name, vit_clip, classnames, tmp_path):
    learner = promptkit.create_learner(name, vit_clip, classnames, seed=0)
    with pytest.raises(ValueError, match="depends on the image"):
        learner.export_head(tmp_path)

"""CPL, Bayesian prompt learning and DPL against hand computations of their papers' / authors' code's formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit.learners.cpl import greedy_counterfactual_mask
from promptkit.objectives.counterfactual import factual_contrast
from promptkit.objectives.variational import gaussian_kl_to_standard


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# -- CPL ---------------------------------------------------------------------------------------------------------
def brute_force_mask(x, nx, t, tn):
    """The authors' loop written out: try every unedited coordinate, keep the best, stop once flipped."""
    x, edited = x.clone(), []
    while len(edited) < len(x):
        best, best_i = -math.inf, None
        for i in range(len(x)):
            if i in edited:
                continue
            trial = x.clone()
            trial[i] = nx[i]
            score = float(F.normalize(trial, dim=0) @ tn)
            if score > best:
                best, best_i = score, i
        x[best_i] = nx[best_i]
        edited.append(best_i)
        if float(F.normalize(x, dim=0) @ tn) > float(F.normalize(x, dim=0) @ t):
            break
    return sorted(edited)


def test_cpl_solver_matches_the_greedy_loop():
    for seed in range(4):
        x, nx, t, tn = unit(4, 12, seed=seed)
        mask = greedy_counterfactual_mask(x, nx, t, tn)
        assert mask.nonzero().flatten().tolist() == brute_force_mask(x, nx, t, tn)
        flipped = F.normalize(torch.where(mask, nx, x), dim=0)
        assert mask.all() or flipped @ tn > flipped @ t  # called the negative class, or nothing is left to edit
        stopped = greedy_counterfactual_mask(x, F.normalize(nx + 2 * tn, dim=0), t, tn)
        assert 0 < stopped.sum() < len(x)  # a negative image that looks like its class flips before the end


def test_cpl_counterfactual_and_loss_by_hand(vit_clip, classnames):
    learner = promptkit.create_learner("cpl", vit_clip, classnames, seed=0)
    with pytest.raises(ValueError, match="call learner.fit"):
        learner.training_loss(torch.tensor([0]), image_features=unit(1, vit_clip.embed_dim))
    features, labels = unit(12, vit_clip.embed_dim, seed=1), torch.arange(12) % len(classnames)
    learner.fit(features, labels)
    names = vit_clip.zero_shot_text_features(learner.classnames, ["{}"])
    similarity = names @ names.t() - 10 * torch.eye(len(classnames))
    assert learner.negative_class.tolist() == similarity.argmax(-1).tolist()
    torch.testing.assert_close(learner.class_image, features[:len(classnames)])  # first image per class
    with torch.no_grad():
        learner.mask.uniform_(-1, 2)
    batch, y = unit(3, vit_clip.embed_dim, seed=2), torch.tensor([0, 4, 2])
    cf, mask, valid = learner.counterfactual(batch, y)
    neg = learner.negative_class[y]
    expected_mask = (0.999 * learner.solver_mask[y] + 0.001 * learner.mask[y]).clamp(0, 1)
    torch.testing.assert_close(mask, expected_mask)
    assert set(expected_mask.unique().tolist()) - {0.0} and valid.all()
    hand = (1 - expected_mask) * batch + expected_mask * features[neg]
    torch.testing.assert_close(cf, hand / hand.norm(dim=-1, keepdim=True))
    out = learner.training_loss(y, image_features=batch)
    text = learner.image_text_features(batch)
    xloss = 0.0
    for b in range(3):  # the authors' xloss_compute, per image, per class
        for c in range(len(classnames)):
            pos = F.cosine_similarity(text[b, c], batch[b], dim=0)
            negc = F.cosine_similarity(text[b, c], cf[b], dim=0)
            xloss += -torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(negc))) / len(classnames) / 3
    logits = vit_clip.logit_scale * torch.einsum("bd,bcd->bc", batch, text)
    torch.testing.assert_close(out.terms["ce"], F.cross_entropy(logits, y))
    torch.testing.assert_close(out.terms["cf"], xloss.detach())
    torch.testing.assert_close(out.terms["mask"], 0.07 * expected_mask.norm(dim=-1).mean().detach())
    out.loss.backward()
    assert learner.mask.grad is not None and learner.mask.grad.abs().sum() > 0
    torch.testing.assert_close(factual_contrast(text, batch, batch), torch.full((3,), math.log(2)))


@pytest.mark.parametrize("method, kwargs, terms", [
    ("cpl", {}, {"ce", "cf", "mask"}),
    ("bayesian", {"n_samples": 2}, {"ce", "kl"}),
    ("dpl", {"n_ctx": 4, "width": 32}, {"ce"}),
])
def test_the_trainer_trains_them(method, kwargs, terms, vit_clip, classnames, tmp_path):
    """One trainer for all: the loss falls, every objective's term is logged, and the saved run predicts alike."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 3, 32, 32, generator=g), torch.arange(24) % len(classnames)
    data = torch.utils.data.TensorDataset(images, labels)
    data.classnames, data.targets = list(classnames), labels.tolist()
    learner = promptkit.create_learner(method, vit_clip, classnames, seed=0, **kwargs)
    config = promptkit.TrainConfig(epochs=6, batch_size=8, optimizer="adamw", lr=5e-3, warmup_epochs=0,
                                   device="cpu", output_dir=str(tmp_path), progress=False, log_every=0)
    trainer = promptkit.PromptTrainer(learner, config)
    trainer.fit(data)
    history = trainer.history
    assert {k[len("train_"):] for k in history[-1] if k.startswith("train_")} >= terms
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    loaded = promptkit.load_pretrained(tmp_path / "prompts", vit_clip)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images[:8]), learner.eval()(images[:8]), atol=0, rtol=0)


# -- Bayesian ----------------------------------------------------------------------------------------------------
def test_bayesian_zero_scale_is_cocoop_like(vit_clip, classnames):
    learner = promptkit.create_learner("bayesian", vit_clip, classnames, seed=0, n_samples=3)
    last = learner.meta_net.log_variance[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1e4)  # sigma = exp(-5000) = 0
    feats = unit(4, vit_clip.embed_dim, seed=3)
    with torch.no_grad():
        contexts = learner.ctx + learner.meta_net.mean(feats).unsqueeze(1)
        text = learner.context_text_features(contexts)
        cocoop = (vit_clip.logit_scale * torch.einsum("bd,bcd->bc", feats, text)).log_softmax(-1)
        torch.testing.assert_close(learner(image_features=feats), cocoop, atol=1e-5, rtol=1e-5)
        torch.manual_seed(5)
        training = learner.training_outputs(image_features=feats).logits
        torch.manual_seed(6)
        torch.testing.assert_close(learner.training_outputs(image_features=feats).logits, training)
        torch.testing.assert_close(training, cocoop, atol=1e-5, rtol=1e-5)


def test_bayesian_kl_and_mc_loss_by_hand(vit_clip, classnames):
    mean, log_var = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, -0.7]])
    sigma2 = log_var.exp()
    by_hand = 0.5 * (sigma2 + mean ** 2 - 1 - torch.log(sigma2))  # KL(N(m, s^2) || N(0, 1)) per coordinate
    torch.testing.assert_close(gaussian_kl_to_standard(mean, log_var), by_hand)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mean, sigma2.sqrt()),
                                                  torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl_to_standard(mean, log_var), reference)
    learner = promptkit.create_learner("bayesian", vit_clip, classnames, seed=0, n_samples=2)
    feats, y = unit(2, vit_clip.embed_dim, seed=4), torch.tensor([1, 3])
    torch.manual_seed(0)
    out = learner.training_loss(y, image_features=feats)
    torch.manual_seed(0)
    m, lv = learner.meta_net(feats)
    eps = torch.randn(2, *m.shape)
    with torch.no_grad():
        nll = 0.0
        for b in range(2):  # -log (1/L) sum_l p(y | x, ctx + mu + eps_l sigma)
            probs = []
            for sample in range(2):
                ctx = learner.ctx + (m[b] + eps[sample, b] * torch.exp(0.5 * lv[b]))
                text = learner.context_text_features(ctx[None])[0]
                probs.append((vit_clip.logit_scale * text @ feats[b]).softmax(-1)[y[b]])
            nll += -torch.log(sum(probs) / 2) / 2
    torch.testing.assert_close(out.terms["ce"], nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.terms["kl"], 0.001 * gaussian_kl_to_standard(m, lv).mean().detach())


def test_bayesian_predictions_are_seeded(vit_clip, classnames):
    a = promptkit.create_learner("bayesian", vit_clip, classnames, seed=0, n_samples=3, mc_seed=1)
    b = promptkit.create_learner("bayesian", vit_clip, classnames, seed=0, n_samples=3, mc_seed=1)
    c = promptkit.create_learner("bayesian", vit_clip, classnames, seed=0, n_samples=3, mc_seed=2)
    feats = unit(4, vit_clip.embed_dim, seed=5)
    with torch.no_grad():
        torch.manual_seed(0)
        first = a(image_features=feats)
        torch.manual_seed(1)  # the global random state does not matter
        torch.testing.assert_close(a(image_features=feats), first, atol=0, rtol=0)
        torch.testing.assert_close(b(image_features=feats), first, atol=0, rtol=0)
        torch.testing.assert_close(a(image_features=feats[2:]), first[2:], atol=1e-5, rtol=1e-5)  # nor the batching
        assert not torch.allclose(c(image_features=feats), first)
        torch.testing.assert_close(first.exp().sum(-1), torch.ones(4))  # log of averaged probabilities


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bayesian_sample_count_below_one_is_refused(vit_clip, classnames, bad):
    with pytest.raises(ValueError, match="n_samples .* must be an integer >= 1"):
        promptkit.create_learner("bayesian", vit_clip, classnames, n_samples=bad)


def test_bayesian_unconditional_posterior_is_shared(vit_clip, classnames):
    learner = promptkit.create_learner("bayesian", vit_clip, classnames, seed=0, conditional=False, n_samples=2)
    feats = unit(3, vit_clip.embed_dim)
    mean, log_var = learner.meta_net(feats)
    assert torch.equal(mean, torch.zeros(3, vit_clip.text_width)) and (log_var == log_var[0]).all()
    assert ((0 <= log_var) & (log_var < 1)).all()
    torch.manual_seed(0)
    eps = torch.randn(2, 1, vit_clip.text_width)  # one shift per sample for the batch, as the authors' coopvpt
    with torch.no_grad():
        text = learner.context_text_features(learner.ctx + (eps * torch.exp(0.5 * log_var[:1])).unsqueeze(2)[:, 0])
        hand = (vit_clip.logit_scale * torch.einsum("bd,lcd->lbc", feats, text)).log_softmax(-1)
        torch.manual_seed(0)
        torch.testing.assert_close(learner.training_outputs(image_features=feats).logits,
                                   hand.logsumexp(0) - math.log(2), atol=1e-5, rtol=1e-5)


# -- DPL ---------------------------------------------------------------------------------------------------------
def test_dpl_generator_is_the_published_architecture(vit_clip, classnames):
    learner = promptkit.create_learner("dpl", vit_clip, classnames, seed=0)
    g = learner.generator
    d, w = vit_clip.embed_dim, vit_clip.text_width
    shapes = [tuple(m.weight.shape) for m in (g.input, *g.hiddens, g.output)]
    assert shapes == [(512, d), (512, 512), (16 * w, 512)]  # DomainBed MLP, depth 3, width 512, 16 tokens
    assert g.dropout.p == 0.1
    for layer in (g.input, *g.hiddens, g.output):
        assert torch.all(layer.bias == 0.01)
        bound = math.sqrt(6 / sum(layer.weight.shape))  # Xavier-uniform
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert [n for n, _ in learner.named_parameters() if not n.startswith("clip.")] == [
        "generator.input.weight", "generator.input.bias", "generator.hiddens.0.weight", "generator.hiddens.0.bias",
        "generator.output.weight", "generator.output.bias"]
    g.eval()
    x = unit(5, d)
    manual = g.output(torch.relu(g.hiddens[0](torch.relu(g.input(x)))))
    torch.testing.assert_close(learner.domain_context(x), manual.mean(0).view(16, w))


def test_dpl_prompt_depends_on_the_batch(vit_clip, classnames):
    learner = promptkit.create_learner("dpl", vit_clip, classnames, seed=0, n_ctx=4).eval()
    batch = unit(6, vit_clip.embed_dim, seed=6)
    with torch.no_grad():
        logits = learner(image_features=batch)
        assert logits.shape == (6, len(classnames))
        assert learner.domain_context(batch).shape == (4, vit_clip.text_width)
        text = learner.domain_text_features(batch)
        assert text.shape == (len(classnames), vit_clip.embed_dim)
        torch.testing.assert_close(logits, vit_clip.logit_scale * batch @ text.t())
        # Image 0 scored in another batch: another domain context, other logits; the same batch: the same.
        other = learner(image_features=torch.cat([batch[:1], unit(5, vit_clip.embed_dim, seed=7)]))
        assert not torch.allclose(other[0], logits[0], atol=1e-4)
        torch.testing.assert_close(learner(image_features=batch.flip(0)).flip(0), logits, atol=1e-5, rtol=1e-5)


def test_recipes_of_the_authors_scripts():
    from promptkit.recipes import get_recipe

    dtd = get_recipe("bayesian", "base2novel", 16, "dtd")
    assert (dtd.config.epochs, dtd.method_kwargs) == (10, {"conditional": False, "n_samples": 40})
    eurosat = get_recipe("bayesian", "base2novel", 16, "eurosat")
    assert (eurosat.config.epochs, eurosat.method_kwargs["n_samples"]) == (60, 20)
    assert get_recipe("cpl", "base2novel").config.batch_size == 1
    dpl = get_recipe("dpl", "domainbed", None)
    assert (dpl.config.lr, dpl.config.momentum, dpl.config.scheduler, dpl.config.augment) == (0.001, 0.1, "constant",
                                                                                              None)
    assert "every image" in get_recipe("dpl", "domainbed", 16).notes
    with pytest.raises(ValueError, match="dpl has no few-shot recipe .*its recipes: domainbed"):
        get_recipe("dpl")

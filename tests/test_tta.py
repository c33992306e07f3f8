import copy
import math

import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit.tta.base import marginal_entropy, select_confident
from conftest import assert_unchanged, snapshot


def reference_tpt(learner, views, steps, lr, selection, lambda_=0.0):
    """TPT one sample at a time, straight from the paper: full 77-token open_clip text path, views
    re-encoded every step, a fresh AdamW per sample, prediction on view 0."""
    out = []
    for sample in views:
        model = copy.deepcopy(learner)
        clip = model.clip
        optimizer = torch.optim.AdamW([model.ctx], lr=lr)
        selected = None

        def logits_of(images):
            with promptkit.inject(model.text_hooks()):
                text = F.normalize(clip.model.encode_text(model.tokens), dim=-1)
            image = F.normalize(clip.model.encode_image(images), dim=-1)
            return clip.logit_scale * image @ text.t(), text

        for _ in range(steps):
            logits, text = logits_of(sample)
            if selected is None:
                entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
                selected = torch.argsort(entropy, stable=True)[: int(len(sample) * selection)]
            chosen = logits[selected].log_softmax(-1)
            avg = torch.logsumexp(chosen, 0) - math.log(len(selected))
            loss = -(avg.exp() * avg).sum()
            loss = loss - lambda_ * (text - text.mean(0)).norm(dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            out.append(logits_of(sample[:1])[0][0])
    return torch.stack(out)


@pytest.fixture
def views():
    return torch.randn(3, 12, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def coop(vit_clip, classnames):
    torch.manual_seed(0)
    learner = promptkit.CoOp(vit_clip, classnames, ctx_init="a photo of a")
    with torch.no_grad():
        learner.ctx.add_(0.3 * torch.randn_like(learner.ctx))  # a non-trivial prompt
    return learner


@pytest.mark.parametrize("steps", [1, 2])
def test_tpt_equals_reference(coop, views, steps):
    before_ctx = coop.ctx.detach().clone()
    before = snapshot(coop.clip)
    tpt = promptkit.TPT(coop, steps=steps, lr=5e-2, selection=0.25)
    logits = tpt.adapt_views(views)
    expected = reference_tpt(coop, views, steps, 5e-2, 0.25)
    with torch.no_grad():
        unadapted = coop(views[:, 0])
    assert (expected - unadapted).abs().max() > 1e-3  # adaptation changed something
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=0)
    assert torch.equal(coop.ctx.detach(), before_ctx)
    assert_unchanged(coop.clip, before)


def test_tpt_batched_equals_one_at_a_time(coop, views):
    tpt = promptkit.TPT(coop, steps=2, lr=5e-2, selection=0.25)
    together = tpt.adapt_views(views)
    alone = torch.cat([tpt.adapt_views(views[i:i + 1]) for i in range(len(views))])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)


def test_tpt_zero_steps_is_the_learner(coop, views):
    with torch.no_grad():
        torch.testing.assert_close(promptkit.TPT(coop, steps=0).adapt_views(views), coop(views[:, 0]), atol=1e-5, rtol=0)


def test_ctpt_matches_reference_and_reduces_to_tpt(coop, views):
    torch.testing.assert_close(promptkit.CTPT(coop, lambda_=0.0, lr=5e-2, selection=0.25).adapt_views(views),
                               promptkit.TPT(coop, lr=5e-2, selection=0.25).adapt_views(views), atol=1e-5, rtol=0)
    torch.testing.assert_close(promptkit.CTPT(coop, lambda_=20.0, lr=5e-2, selection=0.25).adapt_views(views),
                               reference_tpt(coop, views, 1, 5e-2, 0.25, lambda_=20.0), atol=2e-4, rtol=0)


def test_tpt_needs_a_text_prompt(vit_clip, classnames):
    with pytest.raises(TypeError, match="Zero or TDA"):
        promptkit.TPT(promptkit.ZeroShotCLIP(vit_clip, classnames))


def test_selection_and_marginal_entropy():
    logits = torch.tensor([[[5.0, 0, 0], [1, 1, 1], [0, 9, 0], [2, 1, 0]]])
    assert select_confident(logits, 0.5).tolist() == [[2, 0]]
    p = logits[0, [2, 0]].softmax(-1).mean(0)
    torch.testing.assert_close(marginal_entropy(logits[:, [2, 0]])[0], -(p * p.log()).sum())


def test_zero_majority_vote_by_hand(vit_clip, classnames):
    class Fixed(promptkit.ZeroShotCLIP):
        def forward(self, images=None, *, image_features=None, text_features=None):
            return table[: len(images)]
    table = torch.tensor([[9.0, 0, 0, 0, 0, 0], [0, 8, 0, 0, 0, 0], [0, 7.5, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                          [0, 0, 0, 0, 0, 0]])
    zero = promptkit.Zero(Fixed(vit_clip, classnames), keep=0.6, n_views=5)
    logits = zero.adapt_views(torch.zeros(1, 5, 3, 32, 32))
    # The 3 most confident views vote 0, 1, 1: class 1 wins with 2/3 of the votes.
    assert logits.argmax().item() == 1
    torch.testing.assert_close(logits.softmax(-1)[0, :2], torch.tensor([1 / 3, 2 / 3]), atol=1e-4, rtol=0)


def test_tda_caches_by_hand(vit_clip):
    class Fixed(promptkit.ZeroShotCLIP):
        def text_features(self):
            return torch.eye(2, 4)
    learner = Fixed(vit_clip, ["a", "b"])
    scale = learner.clip.logit_scale.item()
    tda = promptkit.TDA(learner, pos_shots=1, neg_entropy=(-1.0, -0.5))
    f1 = F.normalize(torch.tensor([[1.0, 0.1, 0, 0]]), dim=-1)
    out1 = tda.adapt_features(f1.unsqueeze(1))
    # Only itself in the positive cache: affinity 1 -> +alpha * one_hot(pred).
    torch.testing.assert_close(out1[0], scale * (f1 @ torch.eye(2, 4).t())[0] + torch.tensor([1.0, 0]))
    f2 = F.normalize(torch.tensor([[1.0, -0.3, 0, 0]]), dim=-1)  # same class, more confident: replaces f1
    tda.adapt_features(f2.unsqueeze(1))
    assert len(tda.positive[0]) == 1 and torch.equal(tda.positive[0][0][1], f2[0])
    tda.reset()
    assert tda.positive == {} and tda.negative == {}


def test_bad_images(coop):
    tpt = promptkit.TPT(coop, n_views=4, augment="crop")
    with pytest.raises(ValueError, match="single image"):
        tpt(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="expects 32x32"):
        tpt(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="RGBA"):
        tpt(torch.zeros(1, 4, 32, 32))
    assert tpt(torch.zeros(2, 1, 32, 32)).shape == (2, coop.n_classes)  # grayscale is replicated


def test_views_shape_and_original_first(coop):
    images = torch.randn(2, 3, 32, 32)
    for augment in ("crop", "augmix"):
        views = promptkit.TPT(coop, n_views=8, augment=augment).views(images)
        assert views.shape == (2, 8, 3, 32, 32)
        assert torch.equal(views[:, 0], images)
        assert not torch.allclose(views[:, 1], images)

"""Every registered method, the same checks. New methods join automatically via `list_methods()`;
per-method constructor keywords that keep the matrix fast live in SMALL."""
import pytest
import torch
import torch.nn.functional as F

import promptkit
from conftest import assert_unchanged, snapshot

SMALL = {"coop": dict(n_ctx=4), "prograd": dict(n_ctx=4), "vpt": dict(n_tokens=4), "cavpt": dict(n_ctx=4, n_vpt=2, class_aware_layers=2, top_k=3),
         "promptsrc": dict(templates=["a photo of a {}.", "itap of a {}."])}


def build(name, clip, classnames):
    return promptkit.create_learner(name, clip, classnames, **SMALL.get(name, {}))


@pytest.mark.parametrize("name", promptkit.list_methods())
def test_method_contract(name, vit_clip, classnames, images, tmp_path):
    before = snapshot(vit_clip)
    learner = build(name, vit_clip, classnames)
    assert learner.method == name
    logits = learner(images)
    assert logits.shape == (len(images), len(classnames))
    text = learner.text_features()
    assert text.shape == (len(classnames), vit_clip.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(classnames)), atol=1e-5, rtol=0)
    params = learner.prompt_parameters()
    assert {id(p) for p in learner.parameters() if p.requires_grad} == {id(p) for p in params}
    labels = torch.arange(len(images)) % len(classnames)
    if params:
        out = learner.training_loss(labels, images)
        out.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert_unchanged(vit_clip, before)
    learner.save_pretrained(tmp_path)
    loaded = promptkit.load_pretrained(tmp_path, vit_clip)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), learner(images), atol=0, rtol=0)


@pytest.mark.parametrize("name", [m for m in promptkit.list_methods() if m != "zeroshot"])
def test_method_learns_a_toy(name, vit_clip, classnames):
    """A realisable task: labels come from the same method with other (random) prompts."""
    torch.manual_seed(0)
    teacher, learner = build(name, vit_clip, classnames), build(name, vit_clip, classnames)
    with torch.no_grad():
        for p in teacher.prompt_parameters():
            p.normal_(0, 1)
        images = torch.randn(16, 3, 32, 32)
        labels = teacher(images).argmax(-1)
    optimizer = torch.optim.AdamW(learner.prompt_parameters(), lr=5e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.cross_entropy(learner(images), labels)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", promptkit.list_methods())
def test_first_forward_on_a_fresh_model(name, classnames, images):
    """The towers' token layout is probed by running them once; a learner's hooks must not trigger that probe
    from inside it (CAVPT did: endless recursion when it was the first prompted forward on a model)."""
    clip = promptkit.load_clip("test-vit")
    assert build(name, clip, classnames)(images).shape == (len(images), len(classnames))

"""Objectives compose with any learner; presets are prompt types + objectives; every term is logged."""
import json

import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit.training import PromptTrainer, TrainConfig
from conftest import assert_unchanged, snapshot


def loss_and_grads(learner, labels, images):
    out = learner.training_loss(labels, images)
    params = learner.prompt_parameters()
    if out.gradient_terms:
        grads = {k: list(torch.autograd.grad(t, params, retain_graph=True, allow_unused=True))
                 for k, t in out.gradient_terms.items()}
        grads = {k: [torch.zeros_like(p) if g is None else g for g, p in zip(v, params)] for k, v in grads.items()}
        return out.loss.detach(), learner.combine_gradients(grads)
    return out.loss.detach(), [torch.zeros_like(p) if g is None else g for g, p in
                               zip(torch.autograd.grad(out.loss, params, allow_unused=True), params)]


def test_presets_are_a_prompt_type_plus_objectives(vit_clip, classnames):
    names = {m: [o.name for o in promptkit.create_learner(m, vit_clip, classnames).objectives]
             for m in ("coop", "kgcoop", "prograd", "promptsrc", "cavpt", "maple")}
    assert names == {"coop": ["ce"], "kgcoop": ["ce", "kgcoop"], "prograd": ["prograd"],
                     "promptsrc": ["ce", "promptsrc", "gpa"], "cavpt": ["dpt"], "maple": ["ce"]}


@pytest.mark.parametrize("preset, prompt_type, keywords, objectives", [
    ("kgcoop", "coop", dict(n_ctx=4, ctx_init="a photo of a"), ["ce", ("kgcoop", {"weight": 8.0})]),
    ("prograd", "coop", dict(n_ctx=16, ctx_init="a photo of a"), [("prograd", {})]),
    ("promptsrc", "ivlp", dict(n_ctx=4, n_vision=4, text_depth=2, vision_depth=3),
     ["ce", ("promptsrc", {"templates": ["a photo of a {}.", "itap of a {}."]}), "gpa"]),
])
def test_presets_equal_their_composition(vit_clip, classnames, images, preset, prompt_type, keywords, objectives):
    """Loss and gradient of each preset equal the same prompt type with the same objectives (1e-6)."""
    extra = {"templates": ["a photo of a {}.", "itap of a {}."]} if preset == "promptsrc" else {}
    a = promptkit.create_learner(preset, vit_clip, classnames, seed=0, **extra)
    b = promptkit.create_learner(prompt_type, vit_clip, classnames, seed=0, objectives=objectives, **keywords)
    b.load_prompt_state_dict(a.prompt_state_dict())
    labels = torch.tensor([0, 1, 2])
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(a, labels, images), loss_and_grads(b, labels, images)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method, objectives, terms", [
    ("maple", ["ce", ("kgcoop", {"weight": 2.0})], {"ce", "kg"}),
    ("vpt", ["ce", ("promptsrc", {"templates": ["a photo of a {}."]})], {"ce", "l1_text", "l1_image", "kl"}),
    ("coop", [("prograd", {}), ("kgcoop", {"weight": 1.0})], {"ce", "kl", "kg"}),
    ("vpt", ["ce", ("carft", {"templates": ["a photo of a {}.", "a sketch of a {}."]})], {"ce", "carft"}),
    ("coop", ["flyp"], {"flyp"}),
])
def test_any_objective_goes_with_any_learner(vit_clip, classnames, tmp_path, method, objectives, terms):
    """A non-preset pair trains with the shared trainer (loss falls, every term logged), saves and reloads with
    its objectives, and leaves CLIP frozen."""
    torch.manual_seed(0)
    teacher = promptkit.create_learner(method, vit_clip, classnames, seed=1)
    with torch.no_grad():
        for p in teacher.prompt_parameters():
            p.normal_(0, 1)
        images = torch.randn(24, 3, 32, 32)
        labels = teacher(images).argmax(-1)
    data = torch.utils.data.TensorDataset(images, labels)
    data.classnames, data.targets = classnames, labels.tolist()
    before = snapshot(vit_clip)
    learner = promptkit.create_learner(method, vit_clip, classnames, seed=0, objectives=objectives)
    PromptTrainer(learner, TrainConfig(epochs=6, batch_size=8, lr=0.05, optimizer="adamw", warmup_epochs=0,
                                       output_dir=str(tmp_path / "run"), progress=False)).fit(data)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {f"train_{t}" for t in terms} <= set(history[-1]), history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"train_{t}" for t in terms} <= set(header)
    assert_unchanged(vit_clip, before)
    loaded = promptkit.load_pretrained(tmp_path / "run" / "prompts", vit_clip)
    assert [o.spec() for o in loaded.objectives] == [o.spec() for o in learner.objectives]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:4]), learner(images[:4]), atol=0, rtol=0)


def test_carft_is_zero_for_text_only_learners_and_the_kl_of_context_distributions(vit_clip, classnames, images):
    templates = ["a photo of a {}.", "a sketch of a {}.", "a painting of the {}."]
    coop = promptkit.create_learner("coop", vit_clip, classnames, objectives=["ce", ("carft", {"templates": templates})])
    assert coop.training_loss(torch.tensor([0, 1, 2]), images).terms["carft"] == 0
    vpt = promptkit.create_learner("vpt", vit_clip, classnames, seed=0, objectives=[("carft", {"templates": templates})])
    with torch.no_grad():
        vpt.prompt_tokens.normal_(0, 1)
    contexts = torch.stack([F.normalize(vit_clip.encode_text(vit_clip.tokenize([t.format(c) for c in vpt.classnames]))
                                        .mean(0), dim=-1) for t in templates])
    scale = vit_clip.logit_scale
    p = (scale * vit_clip.encode_image(images) @ contexts.t()).softmax(-1)
    q = (scale * vpt.encode_image(images) @ contexts.t()).softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(vpt.training_loss(torch.tensor([0, 1, 2]), images).loss, expected, atol=1e-5, rtol=0)


def test_flyp_is_clips_contrastive_loss_over_each_images_class_prompt(vit_clip, classnames, images):
    coop = promptkit.create_learner("coop", vit_clip, classnames, seed=0, objectives=["flyp"])
    labels = torch.tensor([1, 1, 4])  # a duplicate class: still a negative of the other image
    image, text = coop.encode_image(images), coop.text_features()[labels]
    logits = vit_clip.logit_scale * image @ text.t()
    expected = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3))) / 2
    torch.testing.assert_close(coop.training_loss(labels, images).loss, expected, atol=1e-5, rtol=0)


def test_objective_mistakes_are_explained(vit_clip, classnames, images):
    with pytest.raises(KeyError, match="unknown objective 'nope'; available: .*kgcoop"):
        promptkit.create_learner("coop", vit_clip, classnames, objectives=["ce", "nope"])
    with pytest.raises(ValueError, match="at most one gradient rule"):
        promptkit.create_learner("coop", vit_clip, classnames, objectives=["prograd", "prograd"])
    with pytest.raises(ValueError, match="same loss term"):
        promptkit.create_learner("coop", vit_clip, classnames, objectives=["ce", "ce"]).training_loss(
            torch.tensor([0, 1, 2]), images)
    with pytest.raises(ValueError, match="dpt objective needs class-aware visual prompts"):
        promptkit.create_learner("coop", vit_clip, classnames, objectives=["dpt"]).training_loss(
            torch.tensor([0, 1, 2]), images)
    with pytest.raises(ValueError, match="give no loss term; add one"):
        promptkit.create_learner("coop", vit_clip, classnames, objectives=["gpa"]).training_loss(
            torch.tensor([0, 1, 2]), images)
    with pytest.raises(ValueError, match="at least one objective"):
        promptkit.create_learner("coop", vit_clip, classnames, objectives=[])

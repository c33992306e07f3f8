"""Method-specific equivalences and loss terms (tiny random models, fp32)."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit.learners import IVLP, VPT, CoCoOp, KgCoOp, MaPLe, ProGrad, PromptSRC
from conftest import assert_unchanged, snapshot

VISUAL = ["vpt", "ivlp", "maple", "promptsrc", "cavpt"]


def test_vpt_without_tokens_is_zero_shot(vit_clip, classnames, images):
    vpt = VPT(vit_clip, classnames, n_tokens=0, templates=["a photo of a {}.", "itap of a {}."])
    zero_shot = promptkit.ZeroShotCLIP(vit_clip, classnames, templates=["a photo of a {}.", "itap of a {}."])
    with torch.no_grad():
        torch.testing.assert_close(vpt(images), zero_shot(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [IVLP, MaPLe])
def test_depth_zero_without_context_change_is_zero_shot(cls, vit_clip, classnames, images):
    kwargs = dict(text_depth=0, vision_depth=0) if cls is IVLP else dict(depth=0)
    learner = cls(vit_clip, classnames, **kwargs)
    zero_shot = promptkit.ZeroShotCLIP(vit_clip, classnames)
    with torch.no_grad():
        torch.testing.assert_close(learner(images), zero_shot(images), atol=1e-5, rtol=0)


def test_maple_vision_prompts_are_coupled_to_text_prompts(vit_clip, classnames):
    maple = MaPLe(vit_clip, classnames, depth=2)
    prompts = maple.vision_prompts()
    assert len(prompts) == 2 and prompts[0].shape == (2, vit_clip.vision_width)
    torch.testing.assert_close(prompts[1], maple.coupling[1](maple.deep_text[0]))
    loss = maple(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum()
    loss.backward()
    assert maple.deep_text.grad.abs().sum() > 0 and maple.coupling[0].weight.grad.abs().sum() > 0


def _record_block_inputs(blocks, batch_first):
    seen, handles = {}, []
    for i, block in enumerate(blocks):
        def hook(module, args, kwargs, output, i=i):  # a forward hook sees the inputs after all pre-hooks
            x = args[0] if args else kwargs.get("q_x", kwargs.get("x"))
            seen[i] = (x if batch_first else x.transpose(0, 1)).detach().clone()
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def test_deep_prompts_replace_tokens_at_every_layer(vit_clip, classnames, images):
    ivlp = IVLP(vit_clip, classnames, n_ctx=2, n_vision=3, text_depth=2, vision_depth=3)
    seen, handles = _record_block_inputs(vit_clip.vision_blocks, vit_clip.vision_batch_first)
    text_seen, text_handles = _record_block_inputs(vit_clip.text_blocks, vit_clip.text_batch_first)
    try:
        with torch.no_grad():
            ivlp(images)
    finally:
        for h in handles + text_handles:
            h.remove()
    n_patches = (32 // 8) ** 2
    for layer in range(3):
        x = seen[layer]
        assert x.shape[1] == 1 + 3 + n_patches  # prompts are inserted once, then replaced
        if layer > 0:
            torch.testing.assert_close(x[:, 1:4], ivlp.vision[layer].expand(len(images), -1, -1))
    torch.testing.assert_close(text_seen[1][:, 1:3], ivlp.deep_text[0].expand(text_seen[1].shape[0], -1, -1))
    assert promptkit.hooks.count_hooks(vit_clip.model) == 0


def test_vpt_shallow_keeps_the_layer_outputs(vit_clip, classnames, images):
    vpt = VPT(vit_clip, classnames, n_tokens=2, depth=1)
    seen, handles = _record_block_inputs(vit_clip.vision_blocks, vit_clip.vision_batch_first)
    try:
        with torch.no_grad():
            vpt(images)
    finally:
        for h in handles:
            h.remove()
    assert not torch.allclose(seen[1][:, 1:3], vpt.prompt_tokens[0].expand(len(images), -1, -1))


@pytest.mark.parametrize("name", VISUAL)
def test_visual_methods_refuse_resnet_and_text_methods_accept_it(name, rn_clip, classnames):
    with pytest.raises(TypeError, match="VisionTransformer"):
        promptkit.create_learner(name, rn_clip, classnames)


@pytest.mark.parametrize("name", ["coop", "cocoop", "kgcoop", "prograd"])
def test_text_methods_work_on_resnet(name, rn_clip, classnames, images):
    before = snapshot(rn_clip)
    learner = promptkit.create_learner(name, rn_clip, classnames)
    out = learner.training_loss(torch.tensor([0, 1, 2]), images)
    out.loss.backward()
    assert out.logits.shape == (3, len(classnames))
    assert_unchanged(rn_clip, before)


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16"])
def test_real_vit_shapes(arch):
    """Dimensions come from the model: B/32 and B/16 geometry (2 layers per tower to stay fast)."""
    cfg = open_clip.get_model_config(arch)
    vision = dict(cfg["vision_cfg"], layers=2)
    text = dict(cfg["text_cfg"], layers=2)
    clip = promptkit.FrozenCLIP(open_clip.model.CLIP(cfg["embed_dim"], vision_cfg=vision, text_cfg=text))
    image = torch.randn(1, 3, 224, 224)
    for name in ["maple", "ivlp", "vpt", "cocoop"]:
        learner = promptkit.create_learner(name, clip, ["cat", "dog"])
        assert learner(image).shape == (1, 2)


def test_cocoop_with_zero_meta_net_is_coop(vit_clip, classnames, images):
    cocoop = CoCoOp(vit_clip, classnames, text_batch=2)
    with torch.no_grad():
        cocoop.ctx.add_(0.1 * torch.randn_like(cocoop.ctx))
        cocoop.meta_net[2].weight.zero_()
        cocoop.meta_net[2].bias.zero_()
    coop = promptkit.CoOp(vit_clip, classnames, ctx_init="a photo of a")
    with torch.no_grad():
        coop.ctx.copy_(cocoop.ctx)
        torch.testing.assert_close(cocoop(images), coop(images), atol=1e-5, rtol=0)


def test_cocoop_prompts_are_per_image_and_chunking_is_exact(vit_clip, classnames, images):
    torch.manual_seed(0)
    learner = CoCoOp(vit_clip, classnames, text_batch=1)
    with torch.no_grad():
        chunked = learner(images)
        learner.text_batch = 64
        together = learner(images)
        features = learner.encode_image(images)
        own = torch.stack([learner(image_features=features[i:i + 1])[0] for i in range(len(images))])
    torch.testing.assert_close(chunked, together, atol=1e-5, rtol=0)
    torch.testing.assert_close(own, together, atol=1e-5, rtol=0)
    shifts = learner.meta_net(features)
    assert not torch.allclose(shifts[0], shifts[1])


def test_kgcoop_loss_by_hand(vit_clip, classnames, images):
    learner = KgCoOp(vit_clip, classnames)
    labels = torch.tensor([0, 1, 2])
    out = learner.training_loss(labels, images)
    assert out.terms["kg"].abs() < 1e-6  # initialised from the hand-crafted prompt itself
    with torch.no_grad():
        learner.ctx.add_(0.5 * torch.randn_like(learner.ctx))
    out = learner.training_loss(labels, images)
    text = learner.text_features()
    kg = 1 - F.cosine_similarity(text, vit_clip.zero_shot_text_features(classnames, ["a photo of a {}."])).mean()
    ce = F.cross_entropy(learner(images), labels)
    torch.testing.assert_close(out.loss, ce + 8.0 * kg, atol=1e-5, rtol=0)


@pytest.mark.parametrize("conflict", [True, False])
def test_prograd_gradient_is_the_projection(vit_clip, classnames, images, conflict):
    labels = torch.tensor([0, 1, 2])
    for seed in range(50):  # find a context where the two gradients do (not) conflict
        torch.manual_seed(seed)
        learner = ProGrad(vit_clip, classnames, n_ctx=4, init_std=0.5)
        image_features = learner.encode_image(images)
        logits = learner(image_features=image_features)
        zero_shot = learner.logits(image_features, learner.zero_shot_text).detach()
        g = torch.autograd.grad(F.cross_entropy(logits, labels), learner.ctx, retain_graph=True)[0]
        k = torch.autograd.grad(F.kl_div(logits.log_softmax(-1), zero_shot.softmax(-1), reduction="batchmean"),
                                learner.ctx)[0]
        if ((g * k).sum() < 0) == conflict:
            break
    else:
        pytest.fail("no such case found")
    expected = g - (g * k).sum() / k.pow(2).sum() * k if conflict else g
    learner.training_loss(labels, images).loss.backward()
    torch.testing.assert_close(learner.ctx.grad, expected, atol=1e-6, rtol=1e-4)
    if conflict:
        assert (learner.ctx.grad * k).sum().abs() < 1e-4 * g.norm() * k.norm()  # orthogonal to k


def test_promptsrc_loss_terms_by_hand(vit_clip, classnames, images):
    learner = PromptSRC(vit_clip, classnames, templates=["a photo of a {}."])
    labels = torch.tensor([0, 1, 2])
    out = learner.training_loss(labels, images)
    text, image = learner.text_features(), learner.encode_image(images)
    frozen_image = vit_clip.encode_image(images)
    logits = learner.logits(image, text)
    zero_shot = learner.logits(frozen_image, learner.frozen_text)
    expected = (F.cross_entropy(logits, labels) + 25 * (text - learner.frozen_text).abs().mean()
                + 10 * (image - frozen_image).abs().mean()
                + (zero_shot.softmax(-1) * (zero_shot.log_softmax(-1) - logits.log_softmax(-1))).sum() / logits.numel())
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)


def test_promptsrc_gaussian_prompt_aggregation(vit_clip, classnames):
    learner = PromptSRC(vit_clip, classnames, templates=["a photo of a {}."], gpa_mean=2, gpa_std=1)
    epochs, values = 4, [0.0, 1.0, 2.0, 3.0]
    for epoch, value in enumerate(values, 1):
        with torch.no_grad():
            learner.ctx.fill_(value)
        learner.on_epoch_end(epoch, epochs)
    raw = [math.exp(-((e - 2) ** 2) / 2) for e in range(1, 5)]
    expected = sum(w * v for w, v in zip(raw, values)) / sum(raw)
    torch.testing.assert_close(learner.ctx.detach(), torch.full_like(learner.ctx, expected))
    assert learner.gpa_weights(4) == pytest.approx([w / sum(raw) for w in raw])


def test_cavpt_without_visual_parts_is_coop(vit_clip, classnames, images):
    torch.manual_seed(0)
    cavpt = promptkit.create_learner("cavpt", vit_clip, classnames, n_ctx=4, n_vpt=0, class_aware_layers=0)
    coop = promptkit.CoOp(vit_clip, classnames, n_ctx=4)
    with torch.no_grad():
        coop.ctx.copy_(cavpt.ctx)
        torch.testing.assert_close(cavpt(images), coop(images), atol=1e-5, rtol=0)


def test_cavpt_class_aware_prompts_and_aux_loss(vit_clip, classnames, images):
    torch.manual_seed(0)
    cavpt = promptkit.create_learner("cavpt", vit_clip, classnames, n_ctx=4, n_vpt=2, class_aware_layers=2,
                                     top_k=len(classnames))
    seen, handles = _record_block_inputs(vit_clip.vision_blocks, vit_clip.vision_batch_first)
    try:
        out = cavpt.training_loss(torch.tensor([0, 1, 2]), images)
    finally:
        for h in handles:
            h.remove()
    n_patches = (32 // 8) ** 2
    assert [seen[i].shape[1] for i in range(3)] == [1 + 2 + n_patches] + [1 + len(classnames) + n_patches] * 2
    assert "aux" in out.terms  # top_k = all classes: the true class is always among them
    out.loss.backward()
    for name, p in cavpt.named_parameters():
        if not name.startswith("clip."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name

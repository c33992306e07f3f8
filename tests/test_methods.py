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
    vpt = VPT(vit_clip, classnames, n_vision=0, templates=["a photo of a {}.", "itap of a {}."])
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
    vpt = VPT(vit_clip, classnames, n_vision=2, vision_depth=1)
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
        learner = ProGrad(vit_clip, classnames, n_ctx=4, ctx_init=None, init_std=0.5, seed=seed)
        image_features = learner.encode_image(images)
        logits = learner(image_features=image_features)
        zero_shot = learner.logits(image_features, learner.objectives[0].zero_shot_text).detach()
        g = torch.autograd.grad(F.cross_entropy(logits, labels), learner.ctx, retain_graph=True)[0]
        k = torch.autograd.grad(F.kl_div(logits.log_softmax(-1), zero_shot.softmax(-1), reduction="batchmean"),
                                learner.ctx)[0]
        if ((g * k).sum() < 0) == conflict:
            break
    else:
        pytest.fail("no such case found")
    expected = g - (g * k).sum() / k.pow(2).sum() * k if conflict else g
    out = learner.training_loss(labels, images)
    grads = {name: list(torch.autograd.grad(term, [learner.ctx], retain_graph=True))
             for name, term in out.gradient_terms.items()}
    combined = learner.combine_gradients(grads)[0]
    torch.testing.assert_close(combined, expected, atol=1e-6, rtol=1e-4)
    if conflict:
        assert (combined * k).sum().abs() < 1e-4 * g.norm() * k.norm()  # orthogonal to k
    trainer = promptkit.PromptTrainer(learner, promptkit.TrainConfig(output_dir=None, progress=False))
    trainer._step(torch.optim.SGD([learner.ctx], lr=0.0), torch.amp.GradScaler("cuda", enabled=False),
                  [learner.ctx], torch.arange(3), labels, None, images, 0, 0)
    torch.testing.assert_close(learner.ctx.grad, expected, atol=1e-6, rtol=1e-4)  # what the trainer applies


def test_prograd_context_and_templates_are_the_official_ones(vit_clip, classnames):
    """16 tokens: zero vectors, then the words of ProGrad's template before the class name; the zero-shot
    teacher uses ProGrad's per-dataset template (which differs from CoOp's and KgCoOp's)."""
    embedding = vit_clip.model.token_embedding.weight
    learner = ProGrad(vit_clip, classnames)
    words = vit_clip.word_ids("a photo of a")
    assert learner.ctx.shape == (16, vit_clip.text_width)
    assert torch.equal(learner.ctx[:12], torch.zeros(12, vit_clip.text_width))
    assert torch.equal(learner.ctx[12:], embedding[words])
    dtd = ProGrad(vit_clip, classnames, dataset="dtd")
    assert torch.equal(dtd.ctx[13:], embedding[vit_clip.word_ids("a texture of")])
    torch.testing.assert_close(dtd.objectives[0].zero_shot_text, vit_clip.zero_shot_text_features(dtd.classnames, ["a texture of {}."]))
    kg = KgCoOp(vit_clip, classnames, dataset="DescribableTextures")
    torch.testing.assert_close(kg.objectives[1].handcrafted, vit_clip.zero_shot_text_features(
        kg.classnames, ["a photo of a {}, a type of texture."]))
    zs = promptkit.ZeroShotCLIP(vit_clip, classnames, dataset="dtd")
    torch.testing.assert_close(zs.text_features(), vit_clip.zero_shot_text_features(zs.classnames, ["{} texture."]))
    with pytest.raises(KeyError, match="unknown dataset 'imagenet-z'"):
        ProGrad(vit_clip, classnames, dataset="imagenet-z")


def test_coop_context_init_forms(vit_clip, classnames, images):
    embedding = vit_clip.model.token_embedding.weight
    short = promptkit.CoOp(vit_clip, classnames, ctx_init="a photo of a")
    assert short.n_ctx == 4
    padded = promptkit.CoOp(vit_clip, classnames, n_ctx=6, ctx_init="a photo of a")
    assert torch.equal(padded.ctx[:2], torch.zeros(2, vit_clip.text_width))
    assert torch.equal(padded.ctx[2:], embedding[vit_clip.word_ids("a photo of a")])
    with pytest.raises(ValueError, match="n_ctx=3 is shorter than ctx_init"):
        promptkit.CoOp(vit_clip, classnames, n_ctx=3, ctx_init="a photo of a")
    assert promptkit.CoOp(vit_clip, classnames).n_ctx == 16


def test_seed_makes_the_initialisation_reproducible_and_leaves_the_global_rng_alone(vit_clip, classnames):
    for name in ("coop", "maple", "vpt", "cocoop", "cavpt"):
        state = torch.get_rng_state()
        a = promptkit.create_learner(name, vit_clip, classnames, seed=3).prompt_state_dict()
        assert torch.equal(torch.get_rng_state(), state)
        b = promptkit.create_learner(name, vit_clip, classnames, seed=3).prompt_state_dict()
        c = promptkit.create_learner(name, vit_clip, classnames, seed=4).prompt_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name


def test_promptsrc_loss_terms_by_hand(vit_clip, classnames, images):
    learner = PromptSRC(vit_clip, classnames, templates=["a photo of a {}.", "itap of a {}."])
    labels = torch.tensor([0, 1, 2])
    out = learner.training_loss(labels, images)
    text, image = learner.text_features(), learner.encode_image(images)
    frozen_image = vit_clip.encode_image(images)
    logits = learner.logits(image, text)
    frozen_text = learner.objectives[1].frozen_text
    zero_shot = learner.logits(frozen_image, frozen_text)
    expected = (F.cross_entropy(logits, labels) + 25 * (text - frozen_text).abs().mean()
                + 10 * (image - frozen_image).abs().mean()
                + (zero_shot.softmax(-1) * (zero_shot.log_softmax(-1) - logits.log_softmax(-1))).sum() / logits.numel())
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)


def test_promptsrc_frozen_text_target_is_the_official_formula(vit_clip, classnames):
    """mean over templates of the unnormalised text features, normalised once; PromptSRC's 60 templates."""
    learner = PromptSRC(vit_clip, classnames)
    assert len(promptkit.templates.PROMPTSRC_TEMPLATES) == 60
    templates = promptkit.templates.PROMPTSRC_TEMPLATES
    raw = torch.stack([vit_clip.model.encode_text(vit_clip.tokenize([t.format(c) for t in templates])).mean(0)
                       for c in classnames])
    expected = raw / raw.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(learner.objectives[1].frozen_text, expected, atol=1e-5, rtol=0)
    ensemble = vit_clip.zero_shot_text_features(classnames, templates)  # CLIP's per-template normalisation
    assert not torch.allclose(learner.objectives[1].frozen_text, ensemble, atol=1e-4)
    assert (learner.text_depth, learner.vision_depth) == (2, 3)  # min(9, layers) of the tiny model


def test_ivlp_and_vpt_defaults_are_the_quoted_baselines(vit_clip, classnames):
    ivlp = IVLP(vit_clip, classnames)
    assert (ivlp.text_depth, ivlp.vision_depth) == (len(vit_clip.text_blocks), len(vit_clip.vision_blocks))
    assert ivlp.ctx.shape[0] == 2 and ivlp.vision.shape[1] == 2
    torch.manual_seed(0)
    tokens = VPT(vit_clip, classnames, n_vision=100).prompt_tokens
    assert tokens.mean().abs() < 2e-3 and abs(tokens.std().item() - 0.02) < 1e-3  # N(0, 0.02^2)
    uniform = VPT(vit_clip, classnames, n_vision=100, init="uniform").prompt_tokens
    bound = math.sqrt(6.0 / (3 * 8 * 8 + vit_clip.vision_width))
    assert uniform.abs().max() <= bound and uniform.abs().max() > 0.95 * bound
    maple = MaPLe(vit_clip, classnames)
    deep = list(maple.coupling)[1:]
    assert all(torch.equal(m.weight, deep[0].weight) for m in deep)  # as the official _get_clones
    assert not torch.equal(maple.coupling[0].weight, deep[0].weight)


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
    assert learner.objectives[2].weights(4) == pytest.approx([w / sum(raw) for w in raw])


def test_cavpt_without_visual_parts_is_coop(vit_clip, classnames, images):
    torch.manual_seed(0)
    cavpt = promptkit.create_learner("cavpt", vit_clip, classnames, n_ctx=4, n_vision=0, class_aware_layers=0,
                                     first_stage_epochs=0)
    coop = promptkit.CoOp(vit_clip, classnames, n_ctx=4)
    with torch.no_grad():
        coop.ctx.copy_(cavpt.ctx)
        torch.testing.assert_close(cavpt(images), coop(images), atol=1e-5, rtol=0)


def test_cavpt_reads_unnormalised_text_and_has_the_first_stage_loss(vit_clip, classnames, images):
    cavpt = promptkit.create_learner("cavpt", vit_clip, classnames, n_ctx=4, n_vision=2, top_k=3, seed=0)
    raw = cavpt._raw_text()
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(classnames)), atol=1e-2)
    seen = []
    module = cavpt.class_aware[0]
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach()))
    try:
        with torch.no_grad():
            direct = cavpt(images)
            text = cavpt.text_features()
            shared = cavpt(images, text_features=text)  # evaluation's path: text features computed once
    finally:
        handle.remove()
    torch.testing.assert_close(shared, direct, atol=1e-6, rtol=0)
    top = (vit_clip.encode_image(images) @ cavpt.zero_shot_text.t()).topk(3, dim=-1).indices
    torch.testing.assert_close(seen[0], raw[top].detach(), atol=1e-6, rtol=0)
    labels = torch.tensor([0, 1, 2])
    cavpt.class_aware = torch.nn.ModuleList()  # no aux term: compare the stage losses alone
    cavpt.vpt.data = torch.zeros(len(vit_clip.vision_blocks), 2, vit_clip.vision_width)
    features, text = cavpt.encode_image(images), cavpt.text_features()
    frozen = vit_clip.encode_image(images)
    ce = F.cross_entropy(cavpt.logits(features, text), labels)
    first = (F.cross_entropy(cavpt.logits(frozen, text), labels)
             + F.cross_entropy(cavpt.logits(features, cavpt.zero_shot_text), labels) + 0.1 * ce)
    cavpt.on_epoch_start(0, 60)
    torch.testing.assert_close(cavpt.training_loss(labels, images).loss, first, atol=1e-5, rtol=0)
    cavpt.on_epoch_start(30, 60)
    torch.testing.assert_close(cavpt.training_loss(labels, images).loss, ce, atol=1e-5, rtol=0)


def test_cavpt_class_aware_prompts_and_aux_loss(vit_clip, classnames, images):
    torch.manual_seed(0)
    cavpt = promptkit.create_learner("cavpt", vit_clip, classnames, n_ctx=4, n_vision=2, class_aware_layers=2,
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


class _AlwaysBatchFirst(open_clip.transformer.Transformer):
    """open_clip's development branch: blocks always see [N, L, D] and there is no `batch_first` attribute."""

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


def _relayout(clip, layout):
    import copy

    model = copy.deepcopy(clip.model)
    for tower in (model, model.visual):
        transformer = tower.transformer
        if layout == "sequence-first":  # open_clip 2.x with batch_first=False: blocks see [L, N, D]
            if not isinstance(transformer.resblocks[0].attn, torch.nn.MultiheadAttention):
                pytest.skip("this open_clip's blocks are always batch-first")
            transformer.batch_first = False
            for block in transformer.resblocks:
                block.attn.batch_first = False
        else:
            transformer.__class__ = _AlwaysBatchFirst
            transformer.__dict__.pop("batch_first", None)
    return promptkit.FrozenCLIP(model)


@pytest.mark.parametrize("layout", ["sequence-first", "no attribute"])
def test_token_layout_is_read_from_what_open_clip_does(vit_clip, classnames, images, layout):
    """Deep prompts must be written on the token axis whatever the layout (with the attribute missing, a
    fallback to sequence-first wrote them on the batch axis: crashes or silently wrong logits)."""
    other = _relayout(vit_clip, layout)
    assert other.text_batch_first == other.vision_batch_first == (layout == "no attribute")
    for name in ("ivlp", "maple", "vpt", "cavpt", "promptsrc"):
        reference = promptkit.create_learner(name, vit_clip, classnames, seed=0, **({"templates": ["a {}."]}
                                                                                  if name == "promptsrc" else {}))
        learner = promptkit.create_learner(name, other, classnames, seed=0, **({"templates": ["a {}."]}
                                                                              if name == "promptsrc" else {}))
        eight = images.repeat(3, 1, 1, 1)[:8]
        with torch.no_grad():
            torch.testing.assert_close(learner(eight), reference(eight), atol=1e-4, rtol=0)

"""open_clip backbones beyond the built-in towers: timm image towers (ViT with prefix tokens and token pooling,
SigLIP-shaped attention pooling, ConvNeXt) and SigLIP-style text towers (`CustomTextCLIP`, no causal mask,
last-position pooling). Tiny random models built in-process."""
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import promptkit
from promptkit import _compat
from promptkit.learners import CAVPT, IVLP, VPT, MaPLe
from promptkit.tiny import build_test_model
from conftest import assert_unchanged, snapshot

TEXT = dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2)


@pytest.fixture(scope="module")
def towers():
    return {arch: promptkit.load_clip(arch) for arch in ("test-timm-vit", "test-siglip", "test-convnext")}


def timm_vit_clip(pool: str, **options) -> promptkit.FrozenCLIP:
    """A CLIP whose image tower is the tiny timm ViT (class + 2 register tokens) pooled by `pool` (attention
    pooling is built with timm's own head as projection, as SigLIP's)."""
    embed_dim, proj = (64, "none") if pool == "map" else (32, "linear")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_test_model(embed_dim, dict(image_size=32, timm_model_name="promptkit_test_vit", timm_pool=pool,
                                                 timm_proj=proj), TEXT, **options)
    return promptkit.FrozenCLIP(model)


def by_hand(clip, images, prompts, at_blocks=False):
    """The prompted timm ViT, composed from timm's own modules: prompts[0] inserted after the prefix tokens of
    the embedded sequence (before `norm_pre`; with `at_blocks`, at the input of block 0), replaced by prompts[i]
    at the input of block i, removed after the last block, then timm's and open_clip's heads."""
    trunk, head = clip.model.visual.trunk, clip.model.visual.head
    p, n = trunk.num_prefix_tokens, prompts[0].shape[0]

    def put(x, prompt, replace):
        prompt = prompt.expand(len(x), -1, -1)
        return torch.cat([x[:, :p], prompt, x[:, p + (n if replace else 0):]], dim=1)

    x = trunk._pos_embed(trunk.patch_embed(images))
    x = trunk.norm_pre(x if at_blocks else put(x, prompts[0], False))
    for i, block in enumerate(trunk.blocks):
        if i == 0 and at_blocks:
            x = put(x, prompts[0], False)
        elif 0 < i < len(prompts):
            x = put(x, prompts[i], True)
        x = block(x)
    x = trunk.norm(torch.cat([x[:, :p], x[:, p + n:]], dim=1))
    return F.normalize(head(trunk.forward_head(x)), dim=-1)


def test_tower_kinds_and_the_sites_visual_prompts_use(towers):
    assert [towers[a].vision_kind for a in ("test-timm-vit", "test-siglip", "test-convnext")] == [
        "timm_vit", "timm_vit", "other"]
    site = towers["test-timm-vit"].vision_site
    assert site.prefix_tokens == 3 and site.batch_first  # class + 2 register tokens
    assert towers["test-siglip"].vision_site.prefix_tokens == 0  # SigLIP: no class token
    assert promptkit.load_clip("test-vit").vision_site.pooled is None  # built-in tower: prompts stay, CLS pooled


@pytest.mark.parametrize("arch", ["test-timm-vit", "test-siglip", "test-convnext"])
def test_zero_shot_on_any_tower_is_open_clips_logits(arch, towers, classnames, images):
    """Text-side methods need nothing from the image tower: zero-shot logits are open_clip's own (SigLIP's logit
    bias, a constant per image, does not change softmax or argmax; promptkit's logits leave it out)."""
    clip = towers[arch]
    learner = promptkit.ZeroShotCLIP(clip, classnames)
    tokens = clip.tokenize([f"a photo of a {c}." for c in classnames])
    with torch.no_grad():
        expected, _ = clip.model.get_logits(images, tokens)
        bias = clip.model.logit_bias if getattr(clip.model, "logit_bias", None) is not None else 0.0
        torch.testing.assert_close(learner(images), expected - bias, atol=1e-4, rtol=1e-5)


def test_coop_context_reaches_a_custom_text_tower(towers, classnames, images):
    """CoOp's context hook writes into `CustomTextCLIP.text`'s token embedding: a context initialised from
    words gives open_clip's features of the written-out prompt."""
    clip = towers["test-siglip"]
    coop = promptkit.CoOp(clip, classnames, ctx_init="a photo of a")
    with torch.no_grad():
        tokens = clip.tokenize([f"a photo of a {c}." for c in classnames])
        expected = F.normalize(clip.model.encode_text(tokens), dim=-1)
        torch.testing.assert_close(coop.text_features(), expected, atol=1e-5, rtol=0)


def test_truncated_text_only_where_exact(towers, vit_clip, classnames):
    """Without a causal mask every position sees the padding after the prompt: encoding only up to the pooled
    token would change the features, so such towers are encoded over the full context, decided in _compat."""
    for clip, causal in ((vit_clip, True), (towers["test-siglip"], False)):
        assert _compat.text_is_causal(clip.model) is causal
        tokens = clip.tokenize([f"a photo of a {c}." for c in classnames])
        eot = clip.eot_index(tokens)
        length = int(tokens.argmax(-1).max()) + 1  # the last real token
        assert _compat.text_length(clip.model, eot, clip.context_length) == (length if causal else clip.context_length)
        with torch.no_grad():
            x = clip.token_embedding(tokens).to(clip.dtype)
            full = _compat.text_tower(clip.model, x, eot)
            if causal:
                torch.testing.assert_close(_compat.text_tower(clip.model, x[:, :length], eot), full, atol=1e-5, rtol=0)
            else:  # 'last' pooling of a truncated sequence reads another token, and attention sees fewer tokens
                short = _compat.text_tower(clip.model, x[:, :length], torch.full_like(eot, length - 1))
                assert (short - full).abs().max() > 1e-2
            torch.testing.assert_close(clip.encode_text(tokens, normalize=False), clip.model.encode_text(tokens),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_vpt_on_timm_vit_is_the_hand_composition(pool, classnames, images):
    """Deep VPT on a timm ViT (class + register tokens): prompts after the prefix tokens, fresh at each prompted
    block, out before pooling; equals the composition of timm's own modules. Without tokens: the plain model."""
    clip = timm_vit_clip(pool)
    before = snapshot(clip)
    vpt = VPT(clip, classnames, n_vision=2, vision_depth=2, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(vpt.encode_image(images), by_hand(clip, images, list(vpt.prompt_tokens)),
                                   atol=1e-5, rtol=0)
        plain = F.normalize(clip.model.encode_image(images), dim=-1)
        torch.testing.assert_close(VPT(clip, classnames, n_vision=0).encode_image(images), plain, atol=1e-5, rtol=0)
        assert (vpt.encode_image(images) - plain).abs().max() > 1e-3
    vpt.training_loss(torch.tensor([0, 1, 2]), images).loss.backward()
    assert vpt.prompt_tokens.grad.abs().sum() > 0
    assert_unchanged(clip, before)


def test_siglip_tower_prompts_and_pooling(towers, classnames, images):
    """SigLIP's ViT has no class token (prompts go first) and pools by attention, which must not see them."""
    clip = towers["test-siglip"]
    vpt = VPT(clip, classnames, n_vision=3, vision_depth=3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(vpt.encode_image(images), by_hand(clip, images, list(vpt.prompt_tokens)),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [IVLP, MaPLe])
def test_multimodal_prompts_with_depth_zero_are_zero_shot_on_timm(cls, towers, classnames, images):
    for arch in ("test-timm-vit", "test-siglip"):
        clip = towers[arch]
        kwargs = dict(text_depth=0, vision_depth=0) if cls is IVLP else dict(depth=0)
        with torch.no_grad():
            torch.testing.assert_close(cls(clip, classnames, **kwargs)(images),
                                       promptkit.ZeroShotCLIP(clip, classnames)(images), atol=1e-5, rtol=0)


def test_ivlp_vision_prompts_on_timm_are_vpts(towers, classnames, images):
    """IVLP's and MaPLe's image side is the same hooks as VPT's (one place: `visual_prompt_hooks`)."""
    clip = towers["test-timm-vit"]
    ivlp = IVLP(clip, classnames, n_vision=2, vision_depth=3, seed=0)
    maple = MaPLe(clip, classnames, depth=2, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(ivlp.encode_image(images), by_hand(clip, images, list(ivlp.vision)),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(maple.encode_image(images), by_hand(clip, images, maple.vision_prompts()),
                                   atol=1e-5, rtol=0)


def test_cavpt_on_timm_vit(towers, classnames, images):
    """CAVPT's VPT tokens enter at each block's input after the prefix tokens and leave before pooling;
    with class-aware layers the loss trains them and the model stays frozen."""
    clip = towers["test-timm-vit"]
    cavpt = CAVPT(clip, classnames, n_ctx=4, n_vision=2, class_aware_layers=0, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(cavpt.encode_image(images),
                                   by_hand(clip, images, list(cavpt.vpt), at_blocks=True), atol=1e-5, rtol=0)
    before = snapshot(clip)
    cavpt = CAVPT(clip, classnames, n_ctx=4, n_vision=2, class_aware_layers=1, top_k=len(classnames), seed=0)
    out = cavpt.training_loss(torch.tensor([0, 1, 2]), images)
    assert "aux" in out.terms  # top_k = all classes: the class-aware classifier's CE is in the loss
    out.loss.backward()
    assert cavpt.class_aware[0].kv_tokens.grad.abs().sum() > 0
    assert_unchanged(clip, before)


@pytest.mark.parametrize("name", ["vpt", "ivlp", "maple", "promptsrc", "cavpt"])
def test_visual_methods_refuse_convnext_naming_what_works(name, towers, classnames):
    with pytest.raises(TypeError, match=r"TimmModel.*ConvNeXt.*text-side method \(zeroshot, coop"):
        promptkit.create_learner(name, towers["test-convnext"], classnames)


def test_text_side_training_and_adaptation_on_convnext(towers, classnames, images):
    clip = towers["test-convnext"]
    before = snapshot(clip)
    coop = promptkit.CoOp(clip, classnames, n_ctx=4, seed=0)
    coop.training_loss(torch.tensor([0, 1, 2]), images).loss.backward()
    assert coop.ctx.grad.abs().sum() > 0
    tpt = promptkit.create_adapter("tpt", promptkit.CoOp(clip, classnames, ctx_init="a photo of a"), n_views=4)
    assert tpt(images).shape == (3, len(classnames))
    assert_unchanged(clip, before)


def test_unsupported_text_towers_are_refused_naming_what_is_supported():
    model = build_test_model(64, dict(image_size=32, timm_model_name="promptkit_test_siglip_vit", timm_pool="map",
                                      timm_proj="none"), dict(TEXT, no_causal_mask=True, pool_type="last"),
                             custom_text=True)
    model.text = nn.Linear(2, 2)  # stands in for a Hugging Face text encoder (transformers is not a dependency)
    with pytest.raises(TypeError, match="text tower is Linear.*Supported: open_clip `CLIP` and `CustomTextCLIP`"):
        promptkit.FrozenCLIP(model)
    coca = open_clip.model.CustomTextCLIP(32, dict(image_size=32, patch_size=8, width=64, layers=1),
                                          dict(TEXT, embed_cls=True))
    with pytest.raises(TypeError, match="appends a class token"):
        promptkit.FrozenCLIP(coca)
    sentencepiece = open_clip.model.CustomTextCLIP(32, dict(image_size=32, patch_size=8, width=64, layers=1),
                                                   dict(TEXT, vocab_size=32000))
    with pytest.raises(ValueError, match="another tokenizer"):
        promptkit.FrozenCLIP(sentencepiece)
    for arch, match in (("ViT-B-16-SigLIP", "tokenizer timm/ViT-B-16-SigLIP"), ("roberta-ViT-B-32", "Hugging Face")):
        with pytest.raises(TypeError, match=match):
            promptkit.load_clip(arch)


def test_timm_tower_checkpoints_round_trip(towers, classnames, images, tmp_path):
    clip = towers["test-siglip"]
    maple = MaPLe(clip, classnames, depth=2, seed=0)
    maple.save_pretrained(tmp_path / "maple")
    loaded = promptkit.load_pretrained(tmp_path / "maple", clip)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), maple(images), atol=0, rtol=0)
    with pytest.raises(ValueError, match="different base model"):
        promptkit.load_pretrained(tmp_path / "maple", towers["test-timm-vit"])


def test_visual_prompts_refuse_a_builtin_vit_pooling_over_tokens(classnames):
    """open_clip's own ViT pooled by averaging (CLIPA's) would average the prompt tokens in: refused, not wrong."""
    model = open_clip.model.CLIP(32, dict(image_size=32, patch_size=8, width=64, layers=1, pool_type="avg"), TEXT)
    clip = promptkit.FrozenCLIP(model)
    with pytest.raises(TypeError, match="pools by 'avg'.*class-token pooling only"):
        VPT(clip, classnames)
    assert promptkit.CoOp(clip, classnames).text_features().shape == (len(classnames), 32)

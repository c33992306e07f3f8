"""Shared-prefix text encoding (`FrozenCLIP.encode_text`): the prefix common to many prompts is encoded once and
each prompt over its own suffix only. It must give the numbers of the full path (every row over all its
positions) and of open_clip's own `encode_text`, gradients included, for every learner that uses it."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import promptkit
from conftest import assert_unchanged, snapshot
from promptkit import _compat
from promptkit.clip import TEST_MODELS
from promptkit.tiny import build_test_model

# Class names from 1 to ~40 tokens, and enough classes (> 128) that the suffixes run in several length groups.
NAMES = (["x", "golden retriever puppy playing in the snow on a very cold winter morning next to a frozen lake "
          "with mountains and pine trees far behind it", "traffic light"] + [f"class {i}" for i in range(130)])


def count_prefix_passes(clip, monkeypatch):
    """The prefix length of each prefix pass `clip` runs from now on, so a test can tell that the path ran."""
    calls = []
    encode = clip._encode_prefix

    def counted(*args):
        calls.append(args[1])
        return encode(*args)

    monkeypatch.setattr(clip, "_encode_prefix", counted)
    return calls


@pytest.fixture
def prefix_passes(vit_clip, monkeypatch):
    return count_prefix_passes(vit_clip, monkeypatch)


def with_path(clip, shared, fn):
    clip.shared_prefix = shared
    try:
        return fn()
    finally:
        clip.shared_prefix = True


def perturb(learner):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in learner.prompt_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return learner


def logits_and_grads(learner, images, labels):
    """Logits (no grad) and the gradients of the learner's own training loss w.r.t. its prompt parameters."""
    params = learner.prompt_parameters()
    loss = learner.training_loss(labels, images).loss
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        logits = learner(images)
    return logits, grads


def assert_grads_close(actual, expected, rtol=1e-4):
    for a, e in zip(actual, expected):
        assert (a - e).norm() <= rtol * e.norm() + 1e-12, f"relative gradient error {(a - e).norm() / e.norm():.2e}"


def open_clip_text(learner):
    """open_clip's own `encode_text` (all 77 positions) with the learner's text hooks."""
    with promptkit.inject(learner.text_hooks()):
        return F.normalize(learner.clip.model.encode_text(learner.tokens), dim=-1)


def assert_coop_equals_full_path_and_open_clip(clip, passes, names, n_ctx):
    coop = perturb(promptkit.CoOp(clip, names, n_ctx=n_ctx))
    weights = torch.randn(len(names), clip.embed_dim, generator=torch.Generator().manual_seed(0))
    results = []
    for fn in (coop.text_features, lambda: with_path(clip, False, coop.text_features),
               lambda: open_clip_text(coop)):
        text = fn()
        results.append((text.detach(), torch.autograd.grad((text * weights).sum(), coop.ctx)[0]))
    assert passes == [1 + n_ctx]  # one pass over [SOS] + context, then only the suffixes
    (shared, g_shared), (full, g_full), (reference, g_reference) = results
    scale = clip.logit_scale.item()  # logits are scale x cosine
    torch.testing.assert_close(scale * shared, scale * full, atol=1e-5, rtol=0)
    torch.testing.assert_close(scale * shared, scale * reference, atol=1e-5, rtol=0)
    assert_grads_close([g_shared], [g_full])
    assert_grads_close([g_shared], [g_reference])


@pytest.mark.parametrize("n_ctx", [16, 4])
def test_coop_equals_full_path_and_open_clip(vit_clip, prefix_passes, n_ctx):
    assert_coop_equals_full_path_and_open_clip(vit_clip, prefix_passes, NAMES, n_ctx)


# Text towers of the attention variants open_clip builds (`CLIPTextCfg`): its custom blocks (open_clip's `Attention`
# on every version; on 4.x the default blocks use it too), q/k LayerNorm, scaled cosine attention, NormFormer's
# per-head scale and extra LayerNorms, LayerScale.
ATTENTION_VARIANTS = {
    "default_layer_scale": dict(ls_init_value=0.5),
    "custom": dict(block_type="custom"),
    "qk_norm": dict(qk_norm=True),
    "scaled_cosine": dict(scaled_cosine_attn=True),
    "normformer": dict(scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True),
}


def variant_clip(text_options: dict) -> promptkit.FrozenCLIP:
    embed_dim, vision_cfg, text_cfg = TEST_MODELS["test-vit"]
    torch.manual_seed(0)
    model = build_test_model(embed_dim, dict(vision_cfg, layers=1), dict(text_cfg, **text_options))
    with torch.no_grad():  # LayerNorms, scales and biases start at 1 or 0; move them so that each one counts
        for p in model.transformer.parameters():
            if p.ndim != 2:
                p.add_(0.3 * torch.randn_like(p))
    return promptkit.FrozenCLIP(model)


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_attention_variants_take_the_prefix_path_exactly(monkeypatch, variant):
    options = ATTENTION_VARIANTS[variant]
    if options.get("scaled_cosine_attn") and int(open_clip.__version__.split(".")[0]) < 4:
        pytest.skip("open_clip < 4's own scaled cosine attention fails on its 4-D heads (torch.bmm)")
    clip = variant_clip(options)
    assert all(_compat.prefix_block_problem(block) is None for block in clip.text_blocks)
    assert_coop_equals_full_path_and_open_clip(clip, count_prefix_passes(clip, monkeypatch), NAMES[:20], 4)


def test_unknown_attention_parts_fall_back_to_full_rows(monkeypatch):
    clip = variant_clip(dict(block_type="custom"))
    passes = count_prefix_passes(clip, monkeypatch)
    clip.text_blocks[1].attn.rotary = nn.Identity()  # a part the prefix pass would not apply
    assert "rotary" in _compat.prefix_block_problem(clip.text_blocks[1])
    coop = promptkit.CoOp(clip, NAMES[:6], n_ctx=4)
    with torch.no_grad():
        shared, full = coop.text_features(), with_path(clip, False, coop.text_features)
    assert not passes
    torch.testing.assert_close(shared, full, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["kgcoop", "cocoop", "maple", "ivlp", "promptsrc"])
def test_learners_equal_full_path(vit_clip, prefix_passes, images, method):
    names = NAMES[:3] + NAMES[3:8]
    learner = perturb(promptkit.create_learner(method, vit_clip, names))
    if method == "cocoop":
        learner.text_batch = 2  # several image chunks, each a batch of per-image prefixes
    labels = torch.tensor([0, 1, 2])
    before = snapshot(vit_clip)
    shared = logits_and_grads(learner, images, labels)
    assert prefix_passes, "the shared-prefix path did not run"
    full = with_path(vit_clip, False, lambda: logits_and_grads(learner, images, labels))
    torch.testing.assert_close(shared[0], full[0], atol=1e-5, rtol=0)
    assert_grads_close(shared[1], full[1])
    assert_unchanged(vit_clip, before)
    if method != "cocoop":  # and open_clip's own text encoder with the same hooks (deep prompts included)
        with torch.no_grad():
            scale = vit_clip.logit_scale.item()
            torch.testing.assert_close(scale * learner.text_features(), scale * open_clip_text(learner),
                                       atol=1e-5, rtol=0)


def test_cocoop_shares_the_prefix_per_image(vit_clip, prefix_passes, images):
    cocoop = perturb(promptkit.create_learner("cocoop", vit_clip, NAMES[:6]))
    with torch.no_grad():
        logits = cocoop(images)
        features = cocoop.encode_image(images)
        contexts = cocoop.tunable_context(features)
        expected = []
        for feature, ctx in zip(features, contexts):  # the reference: one image at a time, open_clip's encoder
            hook = promptkit.learners.coop.context_hook(vit_clip, ctx, cocoop.ctx_pos)
            with promptkit.inject([hook]):
                text = F.normalize(vit_clip.model.encode_text(cocoop.tokens), dim=-1)
            expected.append(vit_clip.logit_scale * text @ feature)
    assert prefix_passes == [1 + cocoop.n_ctx]
    torch.testing.assert_close(logits, torch.stack(expected), atol=1e-5, rtol=0)


def test_tpt_batched_text_pass_equals_full_path(vit_clip, prefix_passes):
    """TPT's later steps encode B context copies x C classes in one pass: one prefix per copy."""
    coop = perturb(promptkit.CoOp(vit_clip, NAMES[:40], ctx_init="a photo of a"))
    contexts = (coop.ctx.detach() + 0.1 * torch.randn(3, *coop.ctx.shape)).requires_grad_(True)
    weights = torch.randn(3, 40, vit_clip.embed_dim, generator=torch.Generator().manual_seed(0))
    results = []
    for shared in (True, False):
        text = with_path(vit_clip, shared, lambda: coop.context_text_features(contexts))
        results.append((text.detach(), torch.autograd.grad((text * weights).sum(), contexts)[0]))
    assert prefix_passes == [5]
    scale = vit_clip.logit_scale.item()
    torch.testing.assert_close(scale * results[0][0], scale * results[1][0], atol=1e-5, rtol=0)
    assert_grads_close([results[0][1]], [results[1][1]])


def test_tpt_batched_episodes_equal_full_path(vit_clip, prefix_passes, steps=2):
    coop = perturb(promptkit.CoOp(vit_clip, NAMES[:12], ctx_init="a photo of a"))
    features = F.normalize(torch.randn(3, 8, vit_clip.embed_dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    adapt = lambda: promptkit.TPT(coop, steps=steps, lr=5e-2, selection=0.25).adapt_features(features)
    shared, full = adapt(), with_path(vit_clip, False, adapt)
    assert len(prefix_passes) == steps + 1  # the step-0 pass, batched later steps (one prefix per sample), final
    unadapted = promptkit.TPT(coop, steps=0).adapt_features(features)
    assert (full - unadapted).abs().max() > 1e-3  # the adaptation moved the logits
    # The tolerance of TPT's own reference test (tests/test_tta.py): AdamW's first step divides each gradient
    # entry by its magnitude, so rounding in near-zero entries moves the adapted prompt by up to lr.
    torch.testing.assert_close(shared, full, atol=2e-4, rtol=0)


def test_bf16_autocast_as_accurate_as_full_path(vit_clip, prefix_passes):
    """Under bf16 autocast both paths round differently (bf16 has an 8-bit mantissa, ~4e-3 relative), so they
    cannot agree to 1e-5; the shared path must be as close to the fp32 result as the full path is."""
    coop = perturb(promptkit.CoOp(vit_clip, NAMES[:20], n_ctx=16))
    weights = torch.randn(20, vit_clip.embed_dim, generator=torch.Generator().manual_seed(0))

    def run():
        text = coop.text_features().float()
        return text.detach(), torch.autograd.grad((text * weights).sum(), coop.ctx)[0]

    exact = with_path(vit_clip, False, run)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = run()
        full = with_path(vit_clip, False, run)
    assert prefix_passes
    for i in (0, 1):
        err_shared, err_full = (shared[i] - exact[i]).norm(), (full[i] - exact[i]).norm()
        assert err_full > 0  # bf16 was in effect
        assert err_shared <= 2 * err_full, (i, err_shared, err_full)
    torch.testing.assert_close(shared[0], full[0], atol=3e-2, rtol=0)


def test_zero_shot_templates_share_their_prefix(vit_clip, prefix_passes):
    names = NAMES[:20]
    ensemble = vit_clip.zero_shot_text_features(names, ["a photo of a {}."])
    with torch.no_grad():
        reference = F.normalize(vit_clip.model.encode_text(vit_clip.tokenize([f"a photo of a {n}." for n in names])),
                                dim=-1)
    assert prefix_passes == [5]  # [SOS] a photo of a
    torch.testing.assert_close(ensemble, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["class_specific", "middle", "front", "unknown_hook", "no_causal_mask",
                                  "unknown_block"])
def test_falls_back_to_full_rows(vit_clip, prefix_passes, images, case):
    clip = vit_clip
    kwargs = {"class_specific": dict(class_specific=True), "middle": dict(class_token_position="middle"),
              "front": dict(class_token_position="front")}.get(case, {})
    if case in ("no_causal_mask", "unknown_block"):
        model = copy.deepcopy(vit_clip.model)
        if case == "no_causal_mask":  # e.g. SigLIP's text tower: earlier positions see later ones
            model.attn_mask = None
        else:  # a block class whose forward the prefix pass cannot know
            block = model.transformer.resblocks[1]
            block.__class__ = type("PatchedBlock", (type(block),), {})
        clip = promptkit.FrozenCLIP(model)
    coop = perturb(promptkit.CoOp(clip, NAMES[:6], n_ctx=4, **kwargs))
    hooks = coop.text_hooks()
    if case == "unknown_hook":  # a hook on a text block that does not say which positions it changes
        hooks.append(promptkit.Hook(clip.text_blocks[1], lambda module, args, out: out))
    tokens = coop.tokens
    assert clip._shared_prefix(tokens, int(clip.eot_index(tokens).min()), hooks) is None
    if clip is vit_clip:
        with torch.no_grad():
            clip.encode_text(tokens, hooks=hooks)
        assert not prefix_passes

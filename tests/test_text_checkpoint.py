"""Activation checkpointing of the per-image text pass (`CoCoOp.prompt_set_features`, shared by CoCoOp, CPL and
Bayesian prompt learning): the recomputation in backward must reinstall the context hooks and take the same text
path, so logits and prompt gradients equal those of the kept graph, and nothing stays on the frozen model."""
import pytest
import torch
import torch.nn.functional as F

import promptkit
from conftest import assert_unchanged, snapshot
from promptkit import _compat

NAMES = ["cat", "dog", "golden retriever puppy playing in the snow", "car", "a", "traffic light", "x"]
PREFIX = _compat.prefix_cache_supported(promptkit.load_clip("test-vit").model)
# (method, keywords, Bayesian's fixed prediction noise table instead of fresh noise from a seed)
CASES = [("cocoop", {}, False), ("cpl", {}, False)] + [
    ("bayesian", dict(n_samples=3, conditional=conditional), fixed) for conditional in (True, False)
    for fixed in (False, True)]


def features(n, dim, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def counting(learner):
    """Counts the text passes over a chunk (forward and recomputation alike)."""
    calls = []
    encode = learner.context_text_features

    def counted(contexts):
        calls.append(len(contexts))
        return encode(contexts)

    learner.context_text_features = counted
    return calls


def outputs_and_grads(learner, feats, noise):
    """Training logits (fresh noise from a fixed seed for Bayesian, or its fixed `noise` table) and the prompt
    gradients of a loss that weighs every logit differently."""
    torch.manual_seed(7)
    if noise is None:
        logits = learner.training_outputs(image_features=feats).logits
    else:
        logits = learner.sampled_logits(feats, noise)[0]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    params = learner.prompt_parameters()
    grads = torch.autograd.grad((logits * weights).sum(), params, allow_unused=True)
    return logits.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("shared_prefix", [True, False] if PREFIX else [False])
@pytest.mark.parametrize("method, kwargs, fixed_noise", CASES)
def test_checkpointed_text_pass_equals_kept_graph(vit_clip, monkeypatch, method, kwargs, shared_prefix, fixed_noise):
    monkeypatch.setattr(vit_clip, "shared_prefix", shared_prefix)
    prefix_passes, encode_prefix = [], vit_clip._encode_prefix
    monkeypatch.setattr(vit_clip, "_encode_prefix", lambda *args: prefix_passes.append(1) or encode_prefix(*args))
    before = snapshot(vit_clip)
    feats = features(5, vit_clip.embed_dim)
    # Chunks of 2 contexts: 5 images (x 3 samples for the conditional posterior; 3 shared samples otherwise).
    n_contexts = 5 if method in ("cocoop", "cpl") else (3 if kwargs.get("conditional") is False else 15)
    chunks = [len(chunk) for chunk in torch.arange(n_contexts).split(2)]
    results = {}
    for checkpoint_text in (False, True):
        learner = promptkit.create_learner(method, vit_clip, NAMES, seed=0, text_batch=2,
                                           checkpoint_text=checkpoint_text, **kwargs)
        with torch.no_grad():
            for p in learner.prompt_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        noise = learner.prediction_noise() if fixed_noise else None
        calls = counting(learner)
        results[checkpoint_text] = outputs_and_grads(learner, feats, noise)
        assert sorted(calls) == sorted(chunks * (2 if checkpoint_text else 1))  # checkpointed: rerun in backward
        assert_unchanged(vit_clip, before)  # bitwise frozen, and no hook left after the recomputation
    (kept, kept_grads), (recomputed, recomputed_grads) = results[False], results[True]
    torch.testing.assert_close(recomputed, kept, atol=1e-6, rtol=0)
    assert any(g.abs().sum() > 0 for g in kept_grads)
    for a, b in zip(recomputed_grads, kept_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert bool(prefix_passes) == shared_prefix  # the path under test is the one that ran


def test_auto_checkpoints_only_multi_chunk_steps_with_gradients(vit_clip):
    learner = promptkit.create_learner("cocoop", vit_clip, NAMES, seed=0, text_batch=2)
    assert learner.hparams["checkpoint_text"] == "auto"
    calls = counting(learner)
    feats = features(4, vit_clip.embed_dim)
    learner(image_features=feats).sum().backward()
    assert calls == [2, 2, 2, 2]  # two chunks: each recomputed in backward
    calls.clear()
    learner(image_features=feats[:2]).sum().backward()
    assert calls == [2]  # one chunk: its graph is all there is, nothing to save by recomputing
    calls.clear()
    with torch.no_grad():
        learner(image_features=feats)
    assert calls == [2, 2]
    assert promptkit.hooks.count_hooks(vit_clip.model) == 0


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while `fn` runs (checkpointed regions keep only their
    inputs: their own saved tensors are dropped and recomputed)."""
    total = []

    def pack(tensor):
        total.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return sum(total), out


def test_checkpointing_keeps_only_the_chunk_inputs(vit_clip):
    """The memory claim: with 8 chunks checkpointed, what autograd keeps is a small fraction of the kept graph
    (the text tower's activations of all 8 chunks)."""
    feats = features(8, vit_clip.embed_dim)
    sizes = {}
    for checkpoint_text in (False, True):
        learner = promptkit.create_learner("bayesian", vit_clip, NAMES, seed=0, text_batch=2, n_samples=2,
                                           checkpoint_text=checkpoint_text)
        torch.manual_seed(0)
        sizes[checkpoint_text], logits = saved_bytes(lambda: learner.training_outputs(image_features=feats).logits)
        logits.sum().backward()
    assert sizes[True] < 0.1 * sizes[False], sizes


def test_bayesian_training_noise_does_not_depend_on_text_batch(vit_clip):
    feats = features(5, vit_clip.embed_dim)
    logits = []
    for text_batch in (1, 3, 16):
        learner = promptkit.create_learner("bayesian", vit_clip, NAMES, seed=0, text_batch=text_batch, n_samples=2)
        torch.manual_seed(4)
        with torch.no_grad():
            logits.append(learner.training_outputs(image_features=feats).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0], logits[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad, match", [(dict(checkpoint_text="yes"), "checkpoint_text must be True, False or 'auto'"),
                                        (dict(checkpoint_text=1), "checkpoint_text must be True, False or 'auto'"),
                                        (dict(text_batch=0), r"text_batch .* must be an integer >= 1")])
def test_bad_settings_are_refused(vit_clip, bad, match):
    with pytest.raises(ValueError, match=match):
        promptkit.create_learner("cocoop", vit_clip, NAMES, **bad)

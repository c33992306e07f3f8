"""Every registered method, the same checks. New methods join automatically via `list_methods()`;
per-method constructor keywords that keep the matrix fast live in SMALL."""
import json

import pytest
import torch
import torch.nn.functional as F

import promptkit
from conftest import assert_unchanged, snapshot

SMALL = {"coop": dict(n_ctx=4), "prograd": dict(n_ctx=4), "vpt": dict(n_vision=4), "mvlpt": dict(n_ctx=4), "cavpt": dict(n_ctx=4, n_vision=2, class_aware_layers=2, top_k=3),
         "promptsrc": dict(templates=["a photo of a {}.", "itap of a {}."]),
         "tip-adapter": dict(search_steps=(10, 4)), "tip-adapter-f": dict(search_steps=(10, 4)), "linear-probe": dict(C=1.0),
         "tecoa": dict(n_tokens=4, init_std=0.02),
         "contrastive-adapter": dict(hidden_dim=16, n_positives=8, n_negatives=8, n_neighbours=16),
         "bayesian": dict(n_samples=2), "dpl": dict(n_ctx=4, width=32, dropout=0.0)}


def build(name, clip, classnames):
    learner = promptkit.create_learner(name, clip, classnames, **SMALL.get(name, {}))
    if hasattr(learner, "fit"):  # built from data: two random image features per class
        features = F.normalize(torch.randn(2 * len(classnames), clip.embed_dim,
                                           generator=torch.Generator().manual_seed(0)), dim=-1)
        labels = torch.arange(len(classnames)).repeat(2)
        learner.fit(features, labels, features, labels)
    return learner


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
    if not learner.prompt_parameters():
        pytest.skip(f"{name} is fitted from features, with nothing to learn by gradient")
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


# Every keyword of every method at a non-default value. A new keyword must be added here (the test checks it).
NON_DEFAULT = {
    "zeroshot": dict(templates=["itap of a {}."], dataset="dtd"),
    "coop": dict(n_ctx=3, ctx_init="a photo", class_specific=True, class_token_position="front", init_std=0.5),
    "cocoop": dict(n_ctx=3, ctx_init=None, init_std=0.5, text_batch=2, checkpoint_text=True),
    "kgcoop": dict(n_ctx=5, ctx_init="a photo", class_specific=True, class_token_position="middle", init_std=0.5,
                   weight=2.0, dataset="dtd", templates=["itap of a {}."]),
    "prograd": dict(n_ctx=6, ctx_init="a photo", class_specific=True, class_token_position="front", init_std=0.5,
                    weight=0.5, temperature=2.0, dataset="dtd", templates=["itap of a {}."]),
    "vpt": dict(n_vision=3, vision_depth=2, templates=["itap of a {}."], init="uniform", init_std=0.5),
    "ivlp": dict(n_ctx=3, n_vision=3, ctx_init=None, text_depth=1, vision_depth=2, init_std=0.5),
    "maple": dict(n_ctx=3, ctx_init=None, depth=1),
    "mvlpt": dict(prompt="unified", n_ctx=3, n_vision=2, ctx_init="a photo", class_token_position="end",
                  vision_deep=False, project_dim=16, init_std=0.5),
    "promptsrc": dict(n_ctx=3, n_vision=3, ctx_init=None, text_depth=1, vision_depth=2, text_weight=2.0,
                      image_weight=3.0, gpa_mean=2.0, gpa_std=2.0, templates=["itap of a {}."]),
    "cavpt": dict(n_ctx=5, ctx_init="a photo", class_specific=True, class_token_position="middle", init_std=0.5,
                  n_vision=3, class_aware_layers=2, top_k=3, n_kv=4, attn_dim=8, weight=1.0, first_stage_epochs=3,
                  dataset="dtd", templates=["itap of a {}."], class_text="normalized"),
    "clip-adapter": dict(reduction=2, ratio=0.5, templates=["itap of a {}."], dataset="dtd"),
    "tip-adapter": dict(alpha=2.0, beta=3.0, search_scale=[5.0, 2.0], search_steps=[10, 4],
                        templates=["itap of a {}."], dataset="dtd"),
    "tip-adapter-f": dict(alpha=2.0, beta=3.0, search_scale=[5.0, 2.0], search_steps=[10, 4],
                          templates=["itap of a {}."], dataset="dtd"),
    "linear-probe": dict(C=0.5, max_iter=200, templates=["itap of a {}."], dataset="dtd"),
    "tecoa": dict(n_tokens=3, pad_size=2, templates=["itap of a {}."], init_std=0.5),
    "pouf": dict(n_ctx=3, ctx_init=None, class_specific=True, class_token_position="front", init_std=0.5,
                 transport_weight=2.0, mi_weight=0.5),
    "self-learning": dict(n_ctx=3, ctx_init=None, class_specific=True, class_token_position="front", init_std=0.5,
                          loss="soft", q=0.5, teacher="zero-shot", top_k=2, templates=["itap of a {}."]),
    "contrastive-adapter": dict(hidden_dim=16, batch_norm=False, residual=True, temperature=0.5, n_positives=4,
                                n_negatives=4, n_neighbours=8, text=False, templates=["itap of a {}."], dataset="dtd"),
    "cpl": dict(n_ctx=3, ctx_init=None, init_std=0.5, text_batch=2, checkpoint_text=False),
    "bayesian": dict(n_ctx=3, ctx_init=None, init_std=0.5, text_batch=2, n_samples=3, mc_seed=5,
                     conditional=False, checkpoint_text=True),
    "dpl": dict(n_ctx=3, width=16, depth=4, dropout=0.0),
}


@pytest.mark.parametrize("name, head", [("coop", "zeroshot"), ("coop", "linear-probe"), ("vpt", "linear-probe"),
                                        ("cocoop", "zeroshot"), ("clip-adapter", "linear-probe")])
def test_linear_heads_join_the_contract(name, head, vit_clip, classnames, images, tmp_path):
    """LP-FT's `head=` on any learner: the head is a prompt parameter that gradients reach, CLIP stays frozen,
    and the learner saves and loads with its head."""
    before = snapshot(vit_clip)
    learner = promptkit.create_learner(name, vit_clip, classnames, seed=0, head=head, **SMALL.get(name, {}))
    if head == "linear-probe":
        features = F.normalize(torch.randn(2 * len(classnames), vit_clip.embed_dim,
                                           generator=torch.Generator().manual_seed(0)), dim=-1)
        labels = torch.arange(len(classnames)).repeat(2)
        learner.fit(features, labels, features, labels)
    assert {id(learner.head.weight), id(learner.head.bias)} <= {id(p) for p in learner.prompt_parameters()}
    learner.training_loss(torch.arange(len(images)) % len(classnames), images).loss.backward()
    assert learner.head.weight.grad.abs().sum() > 0
    assert_unchanged(vit_clip, before)
    learner.save_pretrained(tmp_path)
    loaded = promptkit.load_pretrained(tmp_path, vit_clip)
    assert loaded.hparams == learner.hparams and loaded.hparams["head"] == head
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), learner(images), atol=0, rtol=0)


@pytest.mark.parametrize("name", promptkit.list_methods())
def test_every_keyword_survives_save_and_load(name, vit_clip, classnames, images, tmp_path):
    import inspect

    cls = promptkit.registry.METHODS.get(name)
    parameters = {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
                  if k not in ("self", "clip", "classnames")}
    assert set(NON_DEFAULT[name]) == set(parameters), "add the new keyword to NON_DEFAULT"
    assert all(NON_DEFAULT[name][k] != p.default for k, p in parameters.items())
    learner = promptkit.create_learner(name, vit_clip, classnames, seed=0, **NON_DEFAULT[name])
    learner.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "prompt_config.json").read_text())["hparams"]
    assert saved == NON_DEFAULT[name]
    loaded = promptkit.load_pretrained(tmp_path, vit_clip)
    assert loaded.hparams == learner.hparams
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), learner(images), atol=0, rtol=0)


def test_subclasses_record_their_keywords_or_are_refused(vit_clip, classnames, images, tmp_path):
    class Tuned(promptkit.CoOp):  # no __init__ of its own: CoOp's keywords are recorded
        pass

    learner = Tuned(vit_clip, classnames, n_ctx=3, class_token_position="front")
    assert learner.hparams["class_token_position"] == "front" and learner.hparams["n_ctx"] == 3
    learner.save_pretrained(tmp_path)
    assert promptkit.load_pretrained(tmp_path, vit_clip).hparams == learner.hparams
    with pytest.raises(TypeError, match=r"takes \*\*kwargs: spell out every keyword"):
        class Loose(promptkit.CoOp):
            def __init__(self, clip, classnames, weight=1.0, **kwargs):
                super().__init__(clip, classnames, **kwargs)
    with pytest.raises(TypeError, match=r"takes \*rest: spell out"):
        class Positional(promptkit.CoOp):
            def __init__(self, clip, classnames, *rest):
                super().__init__(clip, classnames, *rest)


@pytest.mark.parametrize("name, old, new", [
    ("vpt", dict(n_tokens=2, depth=1), dict(n_vision=2, vision_depth=1)),
    ("ivlp", dict(vision_init_std=0.1), dict(init_std=0.1)),
    ("cavpt", dict(n_vpt=2, aux_weight=0.5), dict(n_vision=2, weight=0.5)),
    ("prograd", dict(lambda_=0.5), dict(weight=0.5)),
])
def test_renamed_keywords_still_work_with_a_warning(name, old, new, vit_clip, classnames):
    with pytest.warns(DeprecationWarning, match="is now"):
        a = promptkit.create_learner(name, vit_clip, classnames, seed=0, **old)
    b = promptkit.create_learner(name, vit_clip, classnames, seed=0, **new)
    assert a.hparams == b.hparams
    assert all(torch.equal(a.prompt_state_dict()[k], v) for k, v in b.prompt_state_dict().items())


@pytest.mark.parametrize("name", promptkit.list_methods())
def test_first_forward_on_a_fresh_model(name, classnames, images):
    """The towers' token layout is probed by running them once, when FrozenCLIP is built; a probe from inside a
    prompted forward would recurse through the learner's hooks (CAVPT did, without end)."""
    clip = promptkit.load_clip("test-vit")
    assert build(name, clip, classnames)(images).shape == (len(images), len(classnames))

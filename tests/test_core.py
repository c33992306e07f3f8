import json
import os
import stat
import pickle

import open_clip
import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit.learners.coop import POSITIONS
from conftest import assert_unchanged, snapshot


def plain_open_clip_logits(clip, images, prompts):
    m = clip.model
    with torch.no_grad():
        img = F.normalize(m.encode_image(images), dim=-1)
        txt = F.normalize(m.encode_text(open_clip.tokenize(prompts)), dim=-1)
    return m.logit_scale.exp() * img @ txt.t()


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_from_init_reproduces_zero_shot(vit_clip, classnames, images, class_specific):
    coop = promptkit.CoOp(vit_clip, classnames, ctx_init="a photo of a", class_specific=class_specific)
    zero_shot = promptkit.ZeroShotCLIP(vit_clip, classnames, templates=["a photo of a {}."])
    reference = plain_open_clip_logits(vit_clip, images, [f"a photo of a {c}." for c in classnames])
    with torch.no_grad():
        logits = coop(images)
        torch.testing.assert_close(logits, zero_shot(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert coop.n_ctx == 4 and coop.ctx.shape == ((len(classnames), 4, 64) if class_specific else (4, 64))


def test_coop_context_really_enters_the_text(vit_clip, classnames, images):
    coop = promptkit.CoOp(vit_clip, classnames, ctx_init="a photo of a")
    before = coop(images).detach()
    with torch.no_grad():
        coop.ctx.add_(0.5 * torch.randn_like(coop.ctx))
    assert (coop(images) - before).abs().max() > 1e-3


@pytest.mark.parametrize("position", POSITIONS)
def test_class_token_positions_place_context_and_name(vit_clip, classnames, position):
    coop = promptkit.CoOp(vit_clip, classnames, n_ctx=4, class_token_position=position)
    x_id = vit_clip.word_ids("X")[0]
    for c, name in enumerate(classnames):
        row = coop.tokens[c]
        assert torch.all(row[coop.ctx_pos[c]] == x_id)
        assert int((row == x_id).sum()) == 4
        name_ids = vit_clip.word_ids(name)
        ids = row.tolist()
        start = next(i for i in range(len(ids)) if ids[i:i + len(name_ids)] == name_ids)
        ctx = coop.ctx_pos[c].tolist()
        if position == "end":
            assert max(ctx) < start
        elif position == "front":
            assert min(ctx) > start
        else:
            assert min(ctx) < start < max(ctx)


def test_truncated_text_path_equals_full_path(vit_clip):
    # Enough prompts of mixed length that the text path splits them into length groups.
    words = ["cat", "small red sports car with two doors and a spoiler on the back", "x", "dog in snow"]
    prompts = [f"a photo of a {words[i % 4]} number {i}." for i in range(130)]
    tokens = open_clip.tokenize(prompts)
    with torch.no_grad():
        full = F.normalize(vit_clip.model.encode_text(tokens), dim=-1)
        short = vit_clip.encode_text(tokens)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("class_specific", [False, True])
def test_class_specific_context_with_length_groups(vit_clip, class_specific):
    names = [f"class {i}" if i % 3 else f"a much longer class name number {i} with extra words" for i in range(140)]
    coop = promptkit.CoOp(vit_clip, names, n_ctx=3, class_specific=class_specific)
    with torch.no_grad():
        coop.ctx.normal_()
        fast = coop.text_features()
        with promptkit.inject(coop.text_hooks()):  # the same hooks through open_clip's own 77-token path
            full = F.normalize(vit_clip.model.encode_text(coop.tokens), dim=-1)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)


def test_gradients_only_on_prompts_and_model_untouched(vit_clip, classnames, images):
    before = snapshot(vit_clip)
    plain_before = plain_open_clip_logits(vit_clip, images, classnames)
    coop = promptkit.CoOp(vit_clip, classnames, n_ctx=4)
    loss = F.cross_entropy(coop(images), torch.tensor([0, 1, 2]))
    loss.backward()
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0
    assert [p for p in coop.parameters() if p.requires_grad] == coop.prompt_parameters() == [coop.ctx]
    assert all(p.grad is None for p in vit_clip.model.parameters())
    assert_unchanged(vit_clip, before)
    torch.testing.assert_close(plain_open_clip_logits(vit_clip, images, classnames), plain_before, atol=0, rtol=0)


def test_hooks_removed_on_exception(vit_clip, classnames):
    coop = promptkit.CoOp(vit_clip, classnames, n_ctx=4)
    with pytest.raises(RuntimeError, match="boom"):
        with promptkit.inject(coop.text_hooks()):
            assert promptkit.hooks.count_hooks(vit_clip.model) == 1
            raise RuntimeError("boom")
    assert promptkit.hooks.count_hooks(vit_clip.model) == 0


def test_zero_shot_template_ensemble(vit_clip, classnames, images):
    templates = ["a photo of a {}.", "a drawing of a {}.", "itap of a {}."]
    model = promptkit.ZeroShotCLIP(vit_clip, classnames, templates=templates)
    per_template = [promptkit.ZeroShotCLIP(vit_clip, classnames, templates=[t]).text_features() for t in templates]
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    torch.testing.assert_close(model.text_features(), expected, atol=1e-6, rtol=0)
    assert model.prompt_parameters() == []


def test_shipped_templates():
    assert len(promptkit.IMAGENET_TEMPLATES) == 80 == len(set(promptkit.IMAGENET_TEMPLATES))
    assert set(promptkit.IMAGENET_TEMPLATES_7) <= set(promptkit.IMAGENET_TEMPLATES)
    assert promptkit.get_templates("OxfordPets") == ("a photo of a {}, a type of pet.",)
    with pytest.raises(KeyError, match="imagenet_7"):
        promptkit.get_templates("nope")


def test_save_load_round_trip(vit_clip, classnames, images, tmp_path):
    coop = promptkit.CoOp(vit_clip, classnames, n_ctx=5, class_token_position="middle")
    coop.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt_config.json", "prompt_weights.safetensors"]
    config = json.loads((tmp_path / "prompt_config.json").read_text())
    assert config["method"] == "coop" and config["hparams"]["class_token_position"] == "middle"
    assert config["base_model"]["arch"] == "test-vit" and config["classnames"] == classnames
    loaded = promptkit.load_pretrained(tmp_path, vit_clip)
    assert type(loaded) is promptkit.CoOp
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), coop(images), atol=0, rtol=0)


def test_load_refuses_other_base_model(vit_clip, rn_clip, classnames, tmp_path):
    promptkit.CoOp(vit_clip, classnames, n_ctx=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vision: saved vit vs given modified_resnet"):
        promptkit.load_pretrained(tmp_path, rn_clip)
    loaded = promptkit.load_pretrained(tmp_path, rn_clip, strict=False)  # text side fits
    assert loaded.ctx.shape == (2, 64)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_disguised_pickle_is_refused_and_not_executed(vit_clip, classnames, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    promptkit.CoOp(vit_clip, classnames, n_ctx=2).save_pretrained(tmp_path)
    (tmp_path / "prompt_weights.safetensors").write_bytes(pickle.dumps({"ctx": _Exploit()}))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        promptkit.load_pretrained(tmp_path, vit_clip)
    assert not (tmp_path / "PWNED").exists()


def test_import_coop_research_checkpoint(vit_clip, classnames, images, tmp_path, monkeypatch):
    ctx = torch.randn(4, 64)
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": ctx, "token_prefix": torch.zeros(1)}, "epoch": 50}, path)
    coop = promptkit.import_coop_checkpoint(path, vit_clip, classnames)
    assert torch.equal(coop.ctx.detach(), ctx)
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"ctx": ctx}, "evil": _Exploit()}, path)
    with pytest.raises(ValueError, match="does not unpickle"):
        promptkit.import_coop_checkpoint(path, vit_clip, classnames)
    assert not (tmp_path / "PWNED").exists()


def test_unsupported_models_are_refused():
    model = open_clip.model.CustomTextCLIP(
        32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1))
    model.text = torch.nn.Identity()  # not open_clip's TextTransformer (as a Hugging Face text tower)
    with pytest.raises(TypeError, match="Supported: open_clip `CLIP`"):
        promptkit.FrozenCLIP(model)


def test_frozen_clip_stays_eval_and_frozen(vit_clip, classnames):
    coop = promptkit.CoOp(vit_clip, classnames, n_ctx=2).train()
    assert coop.training and not vit_clip.model.training
    assert not any(p.requires_grad for p in vit_clip.model.parameters())


def test_bad_arguments_explain_themselves(vit_clip):
    with pytest.raises(ValueError, match="classnames is empty"):
        promptkit.CoOp(vit_clip, [])
    with pytest.raises(ValueError, match="class_token_position"):
        promptkit.CoOp(vit_clip, ["a"], class_token_position="left")
    with pytest.raises(ValueError, match="context length"):
        promptkit.CoOp(vit_clip, ["word " * 80])
    with pytest.raises(KeyError, match="available: .*coop"):
        promptkit.create_learner("nope", vit_clip, ["a"])
    with pytest.raises(ValueError, match="unknown architecture"):
        promptkit.load_clip("ViT-Nope")


def test_openai_tag_builds_quick_gelu(monkeypatch):
    seen = {}

    def fake(arch, pretrained=None, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)  # nothing is downloaded
    openai, laion = "openai", "laion2b_s34b_b88k"
    with pytest.raises(RuntimeError, match="pass its path"):
        promptkit.load_clip("ViT-B-16", pretrained=openai)
    assert seen["force_quick_gelu"] is True
    with pytest.raises(RuntimeError):
        promptkit.load_clip("ViT-B-16", pretrained=laion)
    assert seen["force_quick_gelu"] is False


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(vit_clip, classnames, tmp_path, umask):
    """safetensors replaces the file it writes: the mode must be set after writing (it was 0600 before)."""
    old = os.umask(umask)
    try:
        coop = promptkit.CoOp(vit_clip, classnames, n_ctx=2)
        coop.save_pretrained(tmp_path / "prompts")
        promptkit.PromptTrainer(coop, promptkit.TrainConfig(epochs=1, batch_size=2, output_dir=str(tmp_path / "run"),
                                                            progress=False)).fit(_toy(classnames))
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")]
    assert len(files) >= 6
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def _toy(classnames):
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]))
    data.classnames, data.targets = classnames, [0, 1]
    return data


def test_saves_of_promptkit_0_1_load_with_their_meaning(vit_clip, classnames, images, tmp_path):
    """0.1 recorded n_ctx=16 beside ctx_init (which then set n_ctx), depth None for IVLP's 9 layers, older keyword
    names, and fed CAVPT's class-aware layers normalised text."""
    for learner, legacy in ((promptkit.CoOp(vit_clip, classnames, ctx_init="a photo of a"), {"n_ctx": 16}),
                            (promptkit.create_learner("ivlp", vit_clip, classnames, text_depth=2, vision_depth=3),
                             {"text_depth": None, "vision_depth": None}),
                            (promptkit.create_learner("cavpt", vit_clip, classnames, n_ctx=2, n_vision=2, top_k=3,
                                                      class_text="normalized"), {"n_vpt": 2})):
        learner.save_pretrained(tmp_path / learner.method)
        path = tmp_path / learner.method / "prompt_config.json"
        config = json.loads(path.read_text())
        config["promptkit_version"] = "0.1.0"
        config["hparams"].update(legacy)
        config["hparams"].pop("class_text", None)  # 0.1 fed CAVPT's class-aware layers normalised text
        if "n_vpt" in legacy:  # the old name only
            del config["hparams"]["n_vision"]
        path.write_text(json.dumps(config))
        loaded = promptkit.load_pretrained(tmp_path / learner.method, vit_clip)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), learner(images), atol=0, rtol=0)


def test_non_finite_images_are_refused_at_the_boundary(vit_clip, classnames, images):
    bad = images.clone()
    bad[1, 0, 3, 3] = float("nan")
    bad[2, 1, 0, 0] = float("inf")
    for learner in (promptkit.CoOp(vit_clip, classnames, n_ctx=2), promptkit.create_learner("vpt", vit_clip, classnames),
                    promptkit.Zero(promptkit.ZeroShotCLIP(vit_clip, classnames), n_views=4)):
        with pytest.raises(ValueError, match=r"2 of 3 images contain NaN or infinite values \(batch positions \[1, 2\]"):
            learner(bad)
    data = torch.utils.data.TensorDataset(bad, torch.tensor([0, 1, 2]))
    data.classnames, data.targets = classnames, [0, 1, 2]
    trainer = promptkit.PromptTrainer(promptkit.CoOp(vit_clip, classnames, n_ctx=2),
                                      promptkit.TrainConfig(epochs=1, batch_size=3, output_dir=None, progress=False))
    with pytest.raises(ValueError, match="contain NaN"):
        trainer.fit(data)

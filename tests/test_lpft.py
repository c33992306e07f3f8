"""LP-FT (Kumar et al., ICLR 2022): the `head=` option every learner takes."""
import json

import pytest
import torch
import torch.nn.functional as F

import promptkit
from conftest import assert_unchanged, snapshot
from promptkit.training import PromptTrainer, TrainConfig
from test_heads import dataset


def config(**kw):
    return TrainConfig(**{"batch_size": 6, "optimizer": "adamw", "warmup_epochs": 0, "progress": False,
                          "device": "cpu", **kw})


def spy_fit(learner):
    """Records what the trainer hands the learner's `fit` (stage 1's features)."""
    calls, original = [], learner.fit

    def fit(*args):
        calls.append([a.clone() if torch.is_tensor(a) else a for a in args])
        original(*args)
        calls[-1].append(learner.head.weight.detach().clone())  # the fitted probe

    learner.fit = fit
    return calls


def test_zeroshot_head_of_coop_from_a_photo_of_a_is_zero_shot(vit_clip, classnames, images):
    coop = promptkit.create_learner("coop", vit_clip, classnames, ctx_init="a photo of a", head="zeroshot")
    zero_shot = promptkit.create_learner("zeroshot", vit_clip, classnames)
    with torch.no_grad():
        torch.testing.assert_close(coop(images), zero_shot(images), atol=1e-5, rtol=0)
        expected = vit_clip.logit_scale * vit_clip.encode_image(images) @ zero_shot.text_features().t()
        torch.testing.assert_close(coop.head(vit_clip.encode_image(images)), expected, atol=1e-5, rtol=0)
    assert not hasattr(coop, "fit")  # only the probe head is built from data


def test_stage_one_is_the_linear_probe_and_stage_two_starts_from_it(vit_clip, classnames, images):
    """VPT's prompts are random at initialisation, so its features differ from CLIP's: stage 1 must fit the probe on
    the features the learner's own image path gives (the trainer's cached ones), and the logits at step 0 must be
    that probe's on them."""
    vpt = promptkit.create_learner("vpt", vit_clip, classnames, n_vision=2, seed=0, head="linear-probe")
    calls = spy_fit(vpt)
    start = {k: v.clone() for k, v in vpt.prompt_state_dict().items()}
    PromptTrainer(vpt, config(epochs=1, lr=0.0, weight_decay=0.0)).fit(dataset(classnames, 12),
                                                                        dataset(classnames, 6, 1))
    (features, labels, val_features, val_labels, _), = calls
    with torch.no_grad():
        own = vpt.encode_image(dataset(classnames, 12).tensors[0])
    torch.testing.assert_close(features, own, atol=1e-5, rtol=0)  # VPT's features, not plain CLIP's
    assert not torch.allclose(features, vit_clip.encode_image(dataset(classnames, 12).tensors[0]), atol=1e-3)
    probe = promptkit.create_learner("linear-probe", vit_clip, classnames)
    probe.fit(features, labels, val_features, val_labels)
    torch.testing.assert_close(vpt.head.weight, probe.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(vpt.head.bias, probe.bias, atol=1e-6, rtol=0)
    assert float(vpt.head.chosen_C) == float(probe.chosen_C)
    assert torch.equal(vpt.prompt_tokens, start["prompt_tokens"])  # lr 0: still at step 0
    with torch.no_grad():
        torch.testing.assert_close(vpt(images), probe(image_features=vpt.encode_image(images)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, keywords", [("vpt", dict(n_vision=2)), ("coop", dict(n_ctx=4))])
def test_stage_two_trains_head_and_prompts_and_clip_stays_frozen(method, keywords, vit_clip, classnames, tmp_path):
    before = snapshot(vit_clip)
    learner = promptkit.create_learner(method, vit_clip, classnames, seed=0, head="linear-probe", **keywords)
    calls = spy_fit(learner)
    trainer = PromptTrainer(learner, config(epochs=3, lr=5e-3))
    trainer.fit(dataset(classnames, 12), dataset(classnames, 6, 1))
    assert (learner.head.weight - calls[0][-1]).abs().max() > 1e-4  # trained on from the probe
    assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]
    if method == "vpt":  # the image prompts learn with the head; CoOp's text context no longer reaches the logits
        assert not torch.equal(learner.prompt_tokens, promptkit.create_learner(
            method, vit_clip, classnames, seed=0, **keywords).prompt_tokens)
    assert_unchanged(vit_clip, before)
    learner.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "prompt_config.json").read_text())["hparams"]["head"] == "linear-probe"
    loaded = promptkit.load_pretrained(tmp_path, vit_clip)
    images = dataset(classnames, 4, 2).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), learner(images), atol=0, rtol=0)
    assert float(loaded.head.chosen_C) == float(learner.head.chosen_C)


def test_cli_runs_both_stages(tmp_path):
    from promptkit.cli import main

    out = tmp_path / "run"
    # CoOp: the CLI path is the same for every method, and CoOp's cached features keep the test fast.
    assert main(["train", "--method", "coop", "--arch", "test-vit", "--data", "procedural", "--shots", "2",
                 "--classes", "base", "--recipe", "none", "--out", str(out), "head=linear-probe", "n_ctx=2",
                 "epochs=1", "batch_size=8", "lr=0.001"]) == 0
    saved = json.loads((out / "prompts" / "prompt_config.json").read_text())
    assert saved["hparams"]["head"] == "linear-probe"
    from safetensors.torch import load_file

    chosen = float(load_file(str(out / "prompts" / "prompt_weights.safetensors"))["head.chosen_C"])
    assert chosen == chosen  # stage 1 ran: a C was searched (NaN before)


def test_head_exports_and_bad_heads_are_refused(vit_clip, classnames, images, tmp_path):
    coop = promptkit.create_learner("coop", vit_clip, classnames, seed=0, head="zeroshot")
    coop.export_head(tmp_path)
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "head.safetensors"))
    with torch.no_grad():
        plain = F.normalize(vit_clip.model.encode_image(images), dim=-1) @ head["weight"].t() + head["bias"]
        torch.testing.assert_close(plain, coop(images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="head must be one of"):
        promptkit.create_learner("coop", vit_clip, classnames, head="probe")
    with pytest.raises(ValueError, match="is a linear head already"):
        promptkit.create_learner("linear-probe", vit_clip, classnames, head="zeroshot")
    vpt = promptkit.create_learner("vpt", vit_clip, classnames, n_vision=2, head="linear-probe")
    with pytest.raises(ValueError, match="head='linear-probe' searches C on validation"):
        vpt.fit(torch.randn(12, vit_clip.embed_dim), torch.arange(12) % len(classnames))

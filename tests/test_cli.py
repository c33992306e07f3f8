import json

import pytest

from promptkit.cli import main


def test_list_methods(capsys):
    assert main(["list-methods"]) == 0
    out = capsys.readouterr().out
    objectives = next(line for line in out.splitlines() if line.startswith("objectives:")).split()
    assert "coop" in out and "maple" in out and "tpt" in out and "tda" in out and {"carft", "ce"} <= set(objectives)


def test_train_eval_tta_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--arch", "test-vit", "--data", "procedural", "--classes", "base", "--shots", "2",
                 "--out", str(out), "epochs=2", "n_ctx=4", "progress=false"]) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert (out / "prompts" / "prompt_config.json").exists() and (out / "checkpoint" / "trainer_state.json").exists()
    capsys.readouterr()
    assert main(["eval", "--arch", "test-vit", "--data", "procedural", "--classes", "base", "--load",
                 str(out / "prompts")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 24 * 24 and 0 <= metrics["top1"] <= 100
    assert main(["tta", "--arch", "test-vit", "--data", "procedural", "--method", "tpt", "--load",
                 str(out / "prompts"), "--classes", "base", "--limit", "6", "n_views=4", "augment=crop"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "tpt" and result["n"] == 6 and "ece" in result


def test_user_mistakes_are_one_line(tmp_path, capsys):
    assert main(["train", "--arch", "test-vit", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["train", "--arch", "test-vit", "--data", "procedural", "--method", "nope", "--out",
                 str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])


def test_tta_on_an_image_folder(tmp_path, capsys):
    """Image files reach the adapters as PIL photos of any size (TDA with its one default view; Zero
    with crops cut from the photos), decoded in worker processes."""
    from PIL import Image

    for c, colour in enumerate(["red", "blue"]):
        (tmp_path / f"class_{c}").mkdir()
        for i, size in enumerate([(80, 60), (50, 70)]):
            Image.new("RGB", size, colour).save(tmp_path / f"class_{c}" / f"{i}.png")
    for method, extra in (("tda", []), ("zero", ["n_views=4"])):
        capsys.readouterr()
        assert main(["tta", "--arch", "test-vit", "--data", str(tmp_path), "--method", method, "--batch-size", "3",
                     "--workers", "1", *extra]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["method"] == method and result["n"] == 4 and 0 <= result["top1"] <= 100


def test_seed_fixes_the_random_prompt_init(tmp_path, capsys):
    """CoOp's few-shot context is random: two runs with the same --seed must give bitwise-equal prompts."""
    import torch

    from promptkit.checkpoint import load_tensors

    def run(name, seed):
        out = tmp_path / name
        assert main(["train", "--arch", "test-vit", "--data", "procedural", "--classes", "base", "--shots", "1",
                     "--protocol", "few-shot", "--seed", str(seed), "--out", str(out), "epochs=1",
                     "progress=false"]) == 0
        return load_tensors(out / "prompts" / "prompt_weights.safetensors")["ctx"]

    a, b, c = run("a", 3), run("b", 3), run("c", 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tta_dataset_selects_the_authors_settings(tmp_path, capsys, monkeypatch):
    """--dataset imagenet_r: TDA with 64 AugMix views, alpha/beta 1/8 and CLIP's 80 templates (TDA's ImageNet-R run)."""
    import promptkit.registry
    import promptkit.tta.tda

    built = {}
    real_init = promptkit.tta.tda.TDA.__init__

    def spy(self, learner, **kwargs):
        built.update(kwargs, templates=len(learner.templates))
        real_init(self, learner, **kwargs)

    monkeypatch.setattr(promptkit.tta.tda.TDA, "__init__", spy)
    assert main(["tta", "--arch", "test-vit", "--data", "procedural", "--method", "tda", "--dataset", "imagenet_r",
                 "--limit", "2", "n_views=2"]) == 0
    assert built == {"pos_alpha": 1.0, "pos_beta": 8.0, "n_views": 2, "augment": "augmix", "templates": 80}
    assert main(["tta", "--arch", "test-vit", "--data", "procedural", "--dataset", "imagenet-z"]) == 2
    assert "unknown dataset 'imagenet-z'" in capsys.readouterr().err


def test_renamed_keywords_work_in_the_cli_too(tmp_path, capsys):
    assert main(["train", "--arch", "test-vit", "--data", "procedural", "--classes", "base", "--shots", "1",
                 "--method", "vpt", "--out", str(tmp_path / "run"), "epochs=1", "n_tokens=2", "progress=false"]) == 0
    saved = json.loads((tmp_path / "run" / "prompts" / "prompt_config.json").read_text())["hparams"]
    assert saved["n_vision"] == 2 and "n_tokens" not in saved

"""Weight-space and output-space ensembles (WiSE-FT, soups, PAINT), debiasing, group metrics."""
import json

import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit import weights
from promptkit.cli import main
from promptkit.data import ProceduralBenchmark


def coop(clip, classnames, seed, n_ctx=4, **kw):
    return promptkit.create_learner("coop", clip, classnames, n_ctx=n_ctx, seed=seed, **kw)


def ctx_of(learner):
    return learner.prompt_state_dict()["ctx"]


def constant_coop(clip, classnames, value):
    learner = coop(clip, classnames, seed=0)
    with torch.no_grad():
        learner.ctx.fill_(value)
    return learner


# -- interpolate / ensemble_logits ----------------------------------------------------------------
def test_interpolate_endpoints_exact_and_midpoint(vit_clip, classnames):
    a, b = coop(vit_clip, classnames, 1), coop(vit_clip, classnames, 2)
    before, rng = ctx_of(a).clone(), torch.random.get_rng_state()
    assert torch.equal(ctx_of(promptkit.interpolate(a, b, 0)), ctx_of(a))
    assert torch.equal(torch.random.get_rng_state(), rng)  # building the result draws nothing from the caller's
    assert torch.equal(ctx_of(promptkit.interpolate(a, b, 1)), ctx_of(b))
    mid = promptkit.interpolate(a, b, 0.25)
    torch.testing.assert_close(ctx_of(mid), 0.75 * ctx_of(a) + 0.25 * ctx_of(b))
    assert mid is not a and mid.method == "coop" and mid.hparams == a.hparams and mid.classnames == a.classnames
    assert torch.equal(ctx_of(a), before)
    far = promptkit.interpolate(a, b, 1.5, extrapolate=True)
    torch.testing.assert_close(ctx_of(far), -0.5 * ctx_of(a) + 1.5 * ctx_of(b))


def test_interpolate_refuses_bad_alpha_and_incompatible_learners(vit_clip, rn_clip, classnames):
    a = coop(vit_clip, classnames, 1)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="extrapolate=True"):
            promptkit.interpolate(a, coop(vit_clip, classnames, 2), alpha)
    with pytest.raises(ValueError, match="finite"):
        promptkit.interpolate(a, a, float("nan"), extrapolate=True)
    cases = [(coop(vit_clip, classnames, 2, n_ctx=8), ["n_ctx=4 vs 8", r"ctx \(4, 64\) vs \(8, 64\)"]),
             (coop(vit_clip, classnames[:3], 2), ["class names", "6 vs 3 classes"]),
             (promptkit.create_learner("kgcoop", vit_clip, classnames), ["method 'coop' vs 'kgcoop'"]),
             (coop(rn_clip, classnames, 2), ["base model vision vit vs"]),
             (coop(promptkit.FrozenCLIP(vit_clip.model, arch="test-vit", pretrained="other.bin"), classnames, 2),
              ["base model weights test-vit/None vs test-vit/other.bin"])]
    for other, messages in cases:
        with pytest.raises(ValueError, match="learners 0 and 1 cannot be interpolated") as err:
            promptkit.interpolate(a, other, 0.5)
        for message in messages:
            assert err.match(message)


def test_ensemble_logits_weighted_mean(vit_clip, classnames, images):
    a, b = coop(vit_clip, classnames, 1), promptkit.create_learner("zeroshot", vit_clip, classnames)
    ensemble = promptkit.ensemble_logits([a, b], weights=[3, 1])
    with torch.no_grad():
        torch.testing.assert_close(ensemble(images), 0.75 * a(images) + 0.25 * b(images))
    data = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2]))
    config = promptkit.TrainConfig(output_dir=None, progress=False, device="cpu")
    assert promptkit.PromptTrainer(ensemble, config).evaluate(data)["n"] == 3
    with pytest.raises(ValueError, match="class names"):
        promptkit.ensemble_logits([a, coop(vit_clip, classnames[:2], 1)])
    with pytest.raises(ValueError, match="non-negative"):
        promptkit.ensemble_logits([a, b], weights=[1, -1])
    with pytest.raises(ValueError, match="2 non-negative"):
        promptkit.ensemble_logits([a, b], weights=[1])


# -- soups --------------------------------------------------------------------------------------------
def test_uniform_soup_is_the_mean_and_one_run_is_refused(vit_clip, classnames):
    runs = [coop(vit_clip, classnames, seed) for seed in (1, 2, 3)]
    souped, table = promptkit.soup(runs, method="uniform")
    torch.testing.assert_close(ctx_of(souped), torch.stack([ctx_of(r) for r in runs]).mean(0))
    assert [row["kept"] for row in table] == [True] * 3
    with pytest.raises(ValueError, match="at least 2 runs, got 1"):
        promptkit.soup(runs[:1])
    with pytest.raises(ValueError, match="unknown soup method"):
        promptkit.soup(runs, method="best")
    with pytest.raises(ValueError, match="needs a validation dataset"):
        promptkit.soup(runs, method="greedy")
    with pytest.raises(ValueError, match="cannot be souped"):
        promptkit.soup([runs[0], coop(vit_clip, classnames, 1, n_ctx=2)])


def test_greedy_soup_keeps_a_run_only_if_val_does_not_drop(vit_clip, classnames, monkeypatch):
    # Validation top-1 peaks at context value 1.5: alone, 1.2 ranks first (97), 2.0 second (95), 10 last (15).
    monkeypatch.setattr(weights, "_top1", lambda learner, val: 100 - 10 * abs(ctx_of(learner).mean().item() - 1.5))
    runs = [constant_coop(vit_clip, classnames, v) for v in (2.0, 10.0, 1.2)]
    souped, table = promptkit.soup(runs, method="greedy", val=object())
    assert [row["run"] for row in table] == ["learner 2", "learner 0", "learner 1"]
    assert [row["kept"] for row in table] == [True, True, False]  # soup(1.2, 2.0) = 1.6: 99; adding 10: 71
    assert [row["soup_val_top1"] for row in table] == pytest.approx([97, 99, 71], abs=1e-4)
    torch.testing.assert_close(ctx_of(souped), torch.full_like(ctx_of(souped), 1.6))


def test_soup_cli_round_trip(vit_clip, tmp_path, capsys):
    classnames = ProceduralBenchmark().split("val").classnames
    runs = [coop(vit_clip, classnames, seed) for seed in (1, 2, 3)]
    dirs = []
    for i, run in enumerate(runs):
        run.save_pretrained(tmp_path / f"run{i}" / "prompts")  # a training run's --out directory
        dirs.append(str(tmp_path / f"run{i}"))
    args = ["soup", "--arch", "test-vit", "--data", "procedural", "--device", "cpu", "--runs", *dirs]
    assert main([*args, "--out", str(tmp_path / "uniform")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["run"] for r in rows] == [*dirs, "soup"]
    loaded = promptkit.load_pretrained(tmp_path / "uniform", vit_clip)
    torch.testing.assert_close(ctx_of(loaded), torch.stack([ctx_of(r) for r in runs]).mean(0))

    assert main([*args, "--out", str(tmp_path / "greedy"), "--method", "greedy"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    val = ProceduralBenchmark().split("val")
    expected, table = promptkit.soup(runs, method="greedy", val=val)
    assert [r["kept"] for r in rows] == [r["kept"] for r in table]
    torch.testing.assert_close(ctx_of(promptkit.load_pretrained(tmp_path / "greedy", vit_clip)), ctx_of(expected))

    assert main([*args, "--out", str(tmp_path / "uniform")]) == 2
    assert "already holds prompts" in capsys.readouterr().err
    assert main([*args[:-4], "--runs", dirs[0], "--out", str(tmp_path / "one")]) == 2
    assert "at least 2 runs" in capsys.readouterr().err


# -- PAINT --------------------------------------------------------------------------------------------
def test_patch_picks_the_alpha_of_the_best_average(vit_clip, classnames, monkeypatch):
    patch_val, supported_val = object(), object()

    def top1(learner, val):  # interpolated context value = alpha
        alpha = ctx_of(learner).mean().item()
        return 50 + 50 * alpha if val is patch_val else 90 - 100 * max(0.0, alpha - 0.3)

    monkeypatch.setattr(weights, "_top1", top1)
    zero, tuned = constant_coop(vit_clip, classnames, 0.0), constant_coop(vit_clip, classnames, 1.0)
    chosen, table = promptkit.patch(zero, tuned, patch_val, supported_val)
    assert [row["alpha"] for row in table] == pytest.approx([i / 10 for i in range(11)])
    assert [row["alpha"] for row in table if row["chosen"]] == [pytest.approx(0.3)]
    torch.testing.assert_close(ctx_of(chosen), torch.full_like(ctx_of(chosen), 0.3))
    assert table[3]["mean_top1"] == pytest.approx((65 + 90) / 2)
    # Ties go to the smaller alpha, nearer the unpatched model.
    monkeypatch.setattr(weights, "_top1", lambda learner, val: 80.0)
    assert [row["alpha"] for row in promptkit.patch(zero, tuned, patch_val, supported_val)[1] if row["chosen"]] == [0]
    with pytest.raises(ValueError, match="extrapolate"):
        promptkit.patch(zero, tuned, patch_val, supported_val, alphas=(0.5, 2))


def test_patch_evaluates_a_supported_task_with_other_classes(vit_clip):
    benchmark = ProceduralBenchmark()
    val = benchmark.split("val", classes="base")
    supported = benchmark.split("val", classes="novel")
    zero, tuned = coop(vit_clip, val.classnames, 1), coop(vit_clip, val.classnames, 2)
    chosen, table = promptkit.patch(zero, tuned, val, supported, alphas=(0, 1))
    rebuilt = promptkit.create_learner("coop", vit_clip, supported.classnames, n_ctx=4)
    rebuilt.load_prompt_state_dict(zero.prompt_state_dict())
    config = promptkit.TrainConfig(output_dir=None, progress=False, device="cpu")
    assert table[0]["supported_top1"] == promptkit.PromptTrainer(rebuilt, config).evaluate(supported)["top1"]
    assert chosen.classnames == val.classnames


# -- debiasing ----------------------------------------------------------------------------------------
BIAS = ["a photo of water", "a photo of the ocean", "a photo of a forest"]


def test_debias_plain_projection_is_orthogonal_to_the_bias_directions(vit_clip, classnames):
    learner = promptkit.create_learner("zeroshot", vit_clip, classnames)
    debiased = promptkit.debias(learner, BIAS)
    bias = vit_clip.encode_text(vit_clip.tokenize(BIAS))
    text = debiased.text_features()
    assert (text @ bias.t()).abs().max() < 1e-5
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(classnames)))
    assert debiased.classnames == learner.classnames


def test_debias_calibrated_projection_solves_the_papers_objective():
    torch.manual_seed(0)
    d, lam = 8, 10.0
    bias = F.normalize(torch.randn(2, d), dim=-1).double()
    pairs = F.normalize(torch.randn(3, 2, d), dim=-1).double()
    p0 = weights.debias_projection(bias)
    p = weights.debias_projection(bias, pairs, lam=lam)

    def objective(q):
        diff = pairs[:, 0] - pairs[:, 1]
        return ((q - p0) ** 2).sum() + lam / len(pairs) * ((diff @ q.t()) ** 2).sum()

    # Stationary point of a strictly convex objective: its gradient 2(P - P0) + 2 lam P M vanishes...
    m = (pairs[:, 0] - pairs[:, 1]).t() @ (pairs[:, 0] - pairs[:, 1]) / len(pairs)
    torch.testing.assert_close(p @ (torch.eye(d, dtype=torch.float64) + lam * m), p0)
    # ... so every perturbation is worse; and the plain projection is P0 = I - V (V^T V)^-1 V^T.
    for _ in range(5):
        assert objective(p) < objective(p + 1e-3 * torch.randn(d, d, dtype=torch.float64))
    v = bias.t()
    torch.testing.assert_close(p0, torch.eye(d, dtype=torch.float64) - v @ torch.linalg.inv(v.t() @ v) @ v.t())


def test_debias_calibrated_wrapper_projects_with_the_closed_form(vit_clip, classnames):
    learner = promptkit.create_learner("zeroshot", vit_clip, classnames)
    pairs = [("a cat on water", "a cat in a forest"), ("a dog on water", "a dog in a forest")]
    debiased = promptkit.debias(learner, BIAS, positive_pairs=pairs, lam=100.0)
    embed = lambda texts: vit_clip.encode_text(vit_clip.tokenize(texts))  # noqa: E731
    p = weights.debias_projection(embed(BIAS), embed([t for pair in pairs for t in pair]).view(2, 2, -1), lam=100.0)
    expected = F.normalize(learner.text_features().double() @ p.t(), dim=-1).float()
    torch.testing.assert_close(debiased.text_features(), expected)


def test_debias_fixes_a_spurious_direction_that_misleads_zero_shot(vit_clip):
    # Class 0's text leans on "water"; an image of class 1 on water is then called class 0.
    learner = promptkit.create_learner("zeroshot", vit_clip, ["landbird", "waterbird"])
    b = vit_clip.encode_text(vit_clip.tokenize(["a photo of water"]))[0]
    random = torch.randn(2, b.numel(), generator=torch.Generator().manual_seed(0))
    u0, u1 = torch.linalg.qr(torch.stack([b, *random]).t())[0].t()[1:]  # orthonormal, and orthogonal to b
    learner._text_features = F.normalize(torch.stack([u0 + b, u1 - b]), dim=-1)
    image = F.normalize(u1 + 2 * b, dim=0)[None]
    assert learner(image_features=image).argmax().item() == 0
    assert promptkit.debias(learner, ["a photo of water"])(image_features=image).argmax().item() == 1


def test_debias_bad_input(vit_clip, classnames):
    learner = promptkit.create_learner("zeroshot", vit_clip, classnames)
    for bad in ([], [""], "a photo of water"):
        with pytest.raises(ValueError, match="bias_prompts must be a non-empty list"):
            promptkit.debias(learner, bad)
    with pytest.raises(ValueError, match="pairs"):
        promptkit.debias(learner, BIAS, positive_pairs=[("a", "b", "c")])
    with pytest.raises(ValueError, match="per image"):
        promptkit.debias(promptkit.create_learner("cocoop", vit_clip, classnames), BIAS)


# -- group metrics ------------------------------------------------------------------------------------
def test_worst_group_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0], [2, 0], [0, 2], [0, 2], [2, 0], [0, 2]])  # predictions 0 0 1 1 0 1
    labels = torch.tensor([0, 1, 1, 1, 0, 0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # right: 1/2, 2/2, 1/2 -> worst 50
    metrics = promptkit.classification_metrics(logits, labels, groups=groups)
    assert metrics["per_group"] == {0: 50.0, 1: 100.0, 2: 50.0} and metrics["worst_group"] == 50.0
    assert "worst_group" not in promptkit.classification_metrics(logits, labels)
    with pytest.raises(ValueError, match="one integer group per sample: 6 samples, got \\(5,\\)"):
        promptkit.classification_metrics(logits, labels, groups=groups[:5])
    with pytest.raises(ValueError, match="one integer group per sample"):
        promptkit.classification_metrics(logits, labels, groups=groups.float())


def test_evaluate_passes_groups_through(vit_clip, classnames, images):
    learner = promptkit.create_learner("zeroshot", vit_clip, classnames)
    data = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2]))
    trainer = promptkit.PromptTrainer(learner, promptkit.TrainConfig(output_dir=None, progress=False, device="cpu"))
    metrics = trainer.evaluate(data, groups=[1, 0, 1])
    with torch.no_grad():
        expected = promptkit.classification_metrics(learner(images), torch.tensor([0, 1, 2]), groups=[1, 0, 1])
    assert metrics["per_group"] == expected["per_group"] and metrics["worst_group"] == expected["worst_group"]
    with pytest.raises(ValueError, match="one integer group per sample"):
        trainer.evaluate(data, groups=[0, 1])

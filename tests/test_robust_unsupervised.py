"""PGD attacks and robust evaluation, TeCoA, unlabelled training, POUF and self-learning (UPL's selection)."""
import json

import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit.attacks import NotDifferentiableError, pgd, pixel_normalization
from promptkit.data import Unlabeled
from promptkit.objectives.unsupervised import mutual_information_loss, pseudo_label_loss, top_k_per_class, \
    transport_loss

from conftest import assert_unchanged, snapshot

MEAN, STD = (torch.tensor(v).view(3, 1, 1) for v in (promptkit.attacks.CLIP_MEAN, promptkit.attacks.CLIP_STD))


def pixels_to_input(pixels):
    return (pixels - MEAN) / STD


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    return pixels_to_input(torch.rand(6, 3, 32, 32, generator=g)), torch.tensor([0, 1, 2, 3, 4, 5])


def reference_pgd(model, pixels, labels, eps, steps, step_size, start):
    """PGD as its paper and TeCoA's attacks.py state it, on pixels, written out independently."""
    delta = torch.clamp(start, -pixels, 1 - pixels)
    for _ in range(steps):
        delta = delta.clone().requires_grad_(True)
        loss = F.cross_entropy(model(pixels_to_input(pixels + delta)), labels)
        grad, = torch.autograd.grad(loss, delta)
        delta = torch.clamp(delta.detach() + step_size * grad.sign(), -eps, eps)
        delta = torch.max(torch.min(delta, 1 - pixels), -pixels)
    return pixels + delta


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_matches_a_hand_written_pgd(vit_clip, classnames, batch, random_start):
    learner = promptkit.ZeroShotCLIP(vit_clip, classnames)
    images, labels = batch
    eps, steps, step = 4 / 255, 3, 1.5 / 255
    mean, std = pixel_normalization(vit_clip)
    adversarial = pgd(learner, images, labels, eps=eps, steps=steps, step_size=step, mean=mean, std=std,
                      random_start=random_start, generator=torch.Generator().manual_seed(7))
    start = ((torch.rand(images.shape, generator=torch.Generator().manual_seed(7)) * 2 - 1) * eps if random_start
             else torch.zeros_like(images))
    pixels = images * STD + MEAN
    expected = reference_pgd(learner, pixels, labels, eps, steps, step, start)
    # PGD steps by sign(gradient): an entry whose gradient is at float-rounding level may step the other way in
    # two equal-up-to-rounding computations (normalised vs pixel space), so allow a handful such entries.
    differs = ((adversarial * STD + MEAN) - expected).abs()
    assert (differs > 1e-5).float().mean() < 1e-3 and differs.max() <= 2 * steps * step + 1e-6
    moved = (adversarial * STD + MEAN - pixels).abs()
    assert moved.max() <= eps + 1e-6 and moved.max() > eps / 2  # inside the ball, and it did move
    assert (adversarial * STD + MEAN).min() >= -1e-6 and (adversarial * STD + MEAN).max() <= 1 + 1e-6


def test_pgd_keeps_pixels_in_range_at_the_borders(vit_clip, classnames):
    learner = promptkit.ZeroShotCLIP(vit_clip, classnames)
    pixels = torch.zeros(2, 3, 32, 32)
    pixels[1] = 1.0  # black and white images: half of every step would leave [0, 1]
    adversarial = pgd(learner, pixels_to_input(pixels), torch.tensor([0, 1]), eps=8 / 255, steps=2,
                      step_size=4 / 255, mean=MEAN, std=STD)
    restored = adversarial * STD + MEAN
    assert restored.min() >= -1e-6 and restored.max() <= 1 + 1e-6


def test_robust_evaluation(tmp_path):
    clip = promptkit.load_clip("promptkit-tiny")
    bench = promptkit.data.ProceduralBenchmark(n_test=1)
    data = promptkit.data.Subset(bench.split("test"), range(0, 48, 2))
    learner = promptkit.ZeroShotCLIP(clip, bench.classnames)
    before = snapshot(clip)
    trainer = promptkit.PromptTrainer(learner, promptkit.TrainConfig(device="cpu", output_dir=None, progress=False))
    clean = trainer.evaluate(data)
    attacked = trainer.evaluate(data, attack="pgd", eps=2 / 255, steps=2, step_size=1 / 255)
    assert attacked["top1"] == clean["top1"] and attacked["robust_top1"] <= clean["top1"] - 10
    unattacked = trainer.evaluate(data, attack="pgd", eps=0.0, steps=2, step_size=1 / 255)
    assert unattacked["robust_top1"] == clean["top1"]
    assert attacked["attack"] == {"name": "pgd", "eps": 2 / 255, "steps": 2, "step_size": 1 / 255,
                                  "random_start": True, "seed": 0}
    assert_unchanged(clip, before)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        trainer.evaluate(data, attack="pgd", eps=-1 / 255)
    with pytest.raises(ValueError, match="fraction of it, e.g. 1/255"):
        trainer.evaluate(data, attack="pgd", eps=1.0 + 1)
    with pytest.raises(ValueError, match="unknown attack 'fgsm'"):
        trainer.evaluate(data, attack="fgsm")


def test_an_attack_on_a_forward_without_gradient_is_refused(vit_clip, classnames, batch):
    class Cached(promptkit.ZeroShotCLIP):  # serves detached features, as a lookup of cached features would
        def encode_image(self, images):
            with torch.no_grad():
                return super().encode_image(images)

    learner = Cached(vit_clip, classnames)
    with pytest.raises(NotDifferentiableError, match="not differentiable in the input image"):
        pgd(learner, *batch, eps=1 / 255, steps=1, step_size=1 / 255, mean=MEAN, std=STD)


def test_tecoa_trains_on_the_attacked_images(vit_clip, classnames, batch):
    learner = promptkit.create_learner("tecoa", vit_clip, classnames, seed=0, n_tokens=2,
                                       objectives=[("tecoa", dict(eps=4 / 255, steps=2, random_start=False))])
    images, labels = batch
    out = learner.training_loss(labels, images)
    adversarial = pgd(learner, images, labels, eps=4 / 255, steps=2, step_size=1 / 255, mean=MEAN, std=STD,
                      random_start=False)
    expected = F.cross_entropy(learner(adversarial), labels)
    torch.testing.assert_close(out.terms["tecoa"], expected.detach(), atol=1e-5, rtol=0)
    assert out.terms["tecoa"] > F.cross_entropy(learner(images), labels)  # the attack raised the loss
    out.loss.backward()
    assert all(p.grad is not None for p in learner.prompt_parameters())
    assert learner.pad_size == 4 and learner.padding().shape == (3, 32, 32)  # 30/224 of the side
    assert torch.equal(learner.padding()[:, 4:-4, 4:-4], torch.zeros(3, 24, 24))


def test_the_trainer_serves_images_to_an_attacking_objective(vit_clip, classnames, batch):
    coop = promptkit.create_learner("coop", vit_clip, classnames, n_ctx=2, seed=0,
                                    objectives=[("tecoa", dict(steps=1))])
    data = torch.utils.data.TensorDataset(*batch)
    data.classnames = classnames
    config = promptkit.TrainConfig(epochs=1, batch_size=6, device="cpu", output_dir=None, progress=False)
    metrics = promptkit.PromptTrainer(coop, config).fit(data)
    assert "train_tecoa" in metrics
    with pytest.raises(ValueError, match="needs the images themselves"):
        promptkit.PromptTrainer(coop, promptkit.TrainConfig(cache_image_features=True, device="cpu")).fit(data)


# -- unlabelled training -----------------------------------------------------------------------------------------
def test_unlabelled_training(vit_clip, classnames, batch, tmp_path):
    images, labels = batch
    config = promptkit.TrainConfig(epochs=2, batch_size=6, lr=0.01, device="cpu", output_dir=None, progress=False)
    coop = promptkit.create_learner("coop", vit_clip, classnames, n_ctx=2)
    with pytest.raises(ValueError, match=r"has no labels, but coop's objectives \['ce'\] need them"):
        promptkit.PromptTrainer(coop, config).fit(Unlabeled(torch.utils.data.TensorDataset(images, labels)))

    class Bare(torch.utils.data.Dataset):  # images alone: never a label to read
        classnames = list(batch[1].tolist())

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    pouf = promptkit.create_learner("pouf", vit_clip, classnames, seed=0)
    start = pouf.ctx.detach().clone()
    labelled = torch.utils.data.TensorDataset(images, labels)
    labelled.classnames = classnames
    metrics = promptkit.PromptTrainer(pouf, config).fit(Bare(), labelled)
    assert "train_top1" not in metrics and {"train_transport", "train_mi", "val_top1"} <= set(metrics)
    assert not torch.equal(pouf.ctx, start)
    with pytest.raises(ValueError, match="evaluation .* needs labelled images"):
        promptkit.PromptTrainer(pouf, config).evaluate(Unlabeled(labelled))


def test_cli_trains_unlabelled_and_evaluates_under_attack(tmp_path, capsys):
    from PIL import Image

    from promptkit.cli import main

    data = tmp_path / "images"
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (data / f"class_{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), tuple(v + 20 * i for v in colour)).save(data / f"class_{c}" / f"{i}.png")
    common = ["--arch", "test-vit", "--data", str(data), "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", "--method", "self-learning", *common, "--unlabeled", "--out", str(out), "epochs=2",
                 "batch_size=3", "progress=false"]) == 0
    assert "recipe: self-learning/unsupervised/all-shot" in capsys.readouterr().out
    assert "train_self_learning" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert main(["train", "--method", "coop", *common, "--unlabeled", "--out", str(tmp_path / "c"),
                 "--protocol", "few-shot", "epochs=1"]) == 2
    assert "has no labels, but coop's objectives ['ce'] need them" in capsys.readouterr().err
    assert main(["train", "--method", "pouf", *common, "--unlabeled", "--shots", "4", "--out", str(tmp_path / "p")]) == 2
    assert "--shots would pick images per class by their labels" in capsys.readouterr().err
    assert main(["eval", *common, "--load", str(out / "prompts"), "--attack", "pgd", "--eps", "4/255", "--steps",
                 "2"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["robust_top1"] <= metrics["top1"] and metrics["attack"]["eps"] == 4 / 255
    assert main(["eval", *common, "--attack", "pgd", "--eps=-1/255"]) == 2
    assert "eps must be >= 0" in capsys.readouterr().err


# -- POUF ----------------------------------------------------------------------------------------------------------
def test_pouf_loss_against_a_hand_computation():
    sim = torch.tensor([[0.3, 0.1, -0.2], [0.0, 0.25, 0.05]])
    scale = 10.0
    logits = scale * sim
    e = [[pow(2.718281828459045, float(v)) for v in row] for row in logits.tolist()]
    by_class = [[v / sum(row) for v in row] for row in e]  # softmax over classes
    by_image = [[e[i][c] / (e[0][c] + e[1][c]) for c in range(3)] for i in range(2)]  # softmax over images
    cost = [[1 - float(v) for v in row] for row in sim.tolist()]
    transport = (sum(cost[i][c] * by_class[i][c] for i in range(2) for c in range(3)) / 2
                 + sum(cost[i][c] * by_image[i][c] for i in range(2) for c in range(3)) / 3)
    import math
    entropy = sum(-p * math.log(p + 1e-5) for row in by_class for p in row) / 2
    marginal = [(by_class[0][c] + by_class[1][c]) / 2 for c in range(3)]
    mi = entropy - sum(-m * math.log(m + 1e-6) for m in marginal)
    assert transport_loss(logits, sim).item() == pytest.approx(transport, abs=1e-6)
    assert mutual_information_loss(logits).item() == pytest.approx(mi, abs=1e-6)


def test_pouf_objective_weights(vit_clip, classnames, batch):
    learner = promptkit.create_learner("pouf", vit_clip, classnames, transport_weight=2.0, mi_weight=0.5)
    images, labels = batch
    out = learner.training_loss(labels, images)
    logits = learner(images)
    sim = logits / vit_clip.logit_scale
    torch.testing.assert_close(out.terms["transport"], 2.0 * transport_loss(logits, sim).detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.terms["mi"], 0.5 * mutual_information_loss(logits).detach(), atol=1e-6, rtol=0)
    # No label is read: other labels, the same loss.
    torch.testing.assert_close(learner.training_loss(labels.flip(0), images).loss, out.loss)


# -- self-learning -------------------------------------------------------------------------------------------------
def test_pseudo_label_losses_against_their_formulas():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    teacher = torch.tensor([[0.0, 1.0, 0.5], [3.0, 0.0, 0.0]])
    p = logits.softmax(-1)
    y = torch.tensor([1, 0])  # the teacher's argmax
    hard = -torch.log(p[torch.arange(2), y])
    soft = -(teacher.softmax(-1) * torch.log(p)).sum(-1)
    gce = (1 - p[torch.arange(2), y] ** 0.8) / 0.8
    torch.testing.assert_close(pseudo_label_loss(logits, teacher, "hard"), hard)
    torch.testing.assert_close(pseudo_label_loss(logits, teacher, "soft"), soft)
    torch.testing.assert_close(pseudo_label_loss(logits, teacher, "gce", q=0.8), gce)
    torch.testing.assert_close(pseudo_label_loss(logits, teacher, "gce", q=1.0), 1 - p[torch.arange(2), y])
    with pytest.raises(ValueError, match="loss must be one of hard, soft, gce"):
        pseudo_label_loss(logits, teacher, "entropy")


def test_soft_pseudo_labels_stop_the_gradient_at_the_teacher():
    logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    pseudo_label_loss(logits, logits, "soft").sum().backward()
    # d/dz of -sum(q log softmax(z)) with q fixed = softmax(z) - q = 0 when q = softmax(z)
    torch.testing.assert_close(logits.grad, torch.zeros(1, 3), atol=1e-7, rtol=0)


def test_top_k_per_class():
    probabilities = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.8, 0.2, 0.0], [0.1, 0.7, 0.2],
                                  [0.2, 0.3, 0.5], [0.7, 0.3, 0.0]])
    selected, thresholds = top_k_per_class(probabilities, k=2)
    # class 0 is predicted for images 0 (0.9), 1 (0.6), 2 (0.8), 5 (0.7): the two most confident are 0 and 2
    assert selected.tolist() == [True, False, True, True, True, False]
    torch.testing.assert_close(thresholds, torch.tensor([0.8, 0.7, 0.5]))
    selected, thresholds = top_k_per_class(probabilities[:3], k=1)
    assert selected.tolist() == [True, False, False] and thresholds[1:].isinf().all()


def test_self_learning_objective(vit_clip, classnames, batch):
    images, labels = batch
    learner = promptkit.create_learner("self-learning", vit_clip, classnames, seed=0, ctx_init=None, n_ctx=2)
    out = learner.training_loss(labels, images)
    logits = learner(images)
    torch.testing.assert_close(out.loss, pseudo_label_loss(logits, logits, "gce").mean(), atol=1e-6, rtol=0)
    upl = promptkit.create_learner("self-learning", vit_clip, classnames, seed=0, loss="hard", teacher="zero-shot",
                                   top_k=1, ctx_init=None, n_ctx=2)
    objective = upl.objectives[0]
    with pytest.raises(ValueError, match="calls prepare"):
        upl.training_loss(labels, images)
    features = vit_clip.encode_image(images)
    objective.prepare(upl, features)
    zero_shot = promptkit.ZeroShotCLIP(vit_clip, classnames)(images)
    keep, _ = top_k_per_class(zero_shot.softmax(-1), 1)
    expected = pseudo_label_loss(upl(images), zero_shot, "hard")[keep].mean()
    torch.testing.assert_close(upl.training_loss(labels, images).loss, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="use teacher='zero-shot'"):
        promptkit.create_learner("self-learning", vit_clip, classnames, top_k=4)


def test_the_trainer_prepares_upl_selection_from_the_whole_set(vit_clip, classnames, batch):
    images, labels = batch
    upl = promptkit.create_learner("self-learning", vit_clip, classnames, loss="hard", teacher="zero-shot", top_k=1,
                                   n_ctx=2, ctx_init=None)
    config = promptkit.TrainConfig(epochs=1, batch_size=3, device="cpu", output_dir=None, progress=False)
    promptkit.PromptTrainer(upl, config).fit(Unlabeled(torch.utils.data.TensorDataset(images, labels), classnames))
    zero_shot = promptkit.ZeroShotCLIP(vit_clip, classnames)(images).softmax(-1)
    torch.testing.assert_close(upl.objectives[0].thresholds, top_k_per_class(zero_shot, 1)[1])

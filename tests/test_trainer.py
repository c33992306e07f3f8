import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

import promptkit
from promptkit.checkpoint import load_tensors
from promptkit.data import ProceduralBenchmark
from promptkit.training import NonFiniteLossError, PromptTrainer, TrainConfig
from conftest import assert_unchanged, snapshot

SCRIPT = Path(__file__).with_name("train_script.py")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return ProceduralBenchmark()


def teacher_task(clip, n=96, seed=0):
    """A learnable toy: labels are what CoOp with some other (random) context predicts."""
    torch.manual_seed(seed)
    names = [f"class {i}" for i in range(8)]
    teacher = promptkit.CoOp(clip, names, n_ctx=4)
    with torch.no_grad():
        teacher.ctx.normal_(0, 1)
        images = torch.randn(n, 3, 32, 32)
        labels = teacher(images).argmax(-1)
    dataset = torch.utils.data.TensorDataset(images, labels)
    dataset.classnames, dataset.targets = names, labels.tolist()
    return names, dataset


def split(dataset, lo, hi):
    part = torch.utils.data.TensorDataset(dataset.tensors[0][lo:hi], dataset.tensors[1][lo:hi])
    part.classnames, part.targets = dataset.classnames, dataset.tensors[1][lo:hi].tolist()
    return part


def test_learns_held_out_and_keeps_model_frozen(vit_clip, tmp_path):
    names, data = teacher_task(vit_clip, n=160)
    train, held_out = split(data, 0, 96), split(data, 96, 160)
    before = snapshot(vit_clip)
    learner = promptkit.CoOp(vit_clip, names, n_ctx=4)
    trainer = PromptTrainer(learner, TrainConfig(epochs=15, batch_size=16, lr=0.05, warmup_epochs=0,
                                                 output_dir=str(tmp_path), progress=False))
    start = trainer.evaluate(held_out)["top1"]
    trainer.fit(train, held_out)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["val_top1"] > start + 20, (start, history[-1])
    assert_unchanged(vit_clip, before)
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "prompts" / "prompt_weights.safetensors").exists()
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 15 and state["global_step"] == 15 * 6


def test_cache_gives_same_prompts_as_encoding_every_step(vit_clip):
    names, data = teacher_task(vit_clip, n=32)
    results = []
    for cache in (True, False):
        learner = promptkit.CoOp(vit_clip, names, n_ctx=4)
        with torch.no_grad():
            learner.ctx.copy_(torch.linspace(-1, 1, learner.ctx.numel()).view_as(learner.ctx) * 0.02)
        PromptTrainer(learner, TrainConfig(epochs=2, batch_size=8, output_dir=None, progress=False,
                                           cache_image_features=cache)).fit(data)
        results.append(learner.ctx.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)


def test_optimizer_sees_only_prompts(vit_clip):
    names, data = teacher_task(vit_clip, n=8)
    learner = promptkit.CoOp(vit_clip, names, n_ctx=4)
    trainer = PromptTrainer(learner, TrainConfig(epochs=1, output_dir=None, progress=False))
    optimizer = trainer._optimizer(learner.prompt_parameters())
    assert [p for g in optimizer.param_groups for p in g["params"]] == [learner.ctx]


def test_evaluate_matches_scikit_learn(vit_clip, bench):
    test = bench.split("test")
    learner = promptkit.ZeroShotCLIP(vit_clip, test.classnames)
    metrics = PromptTrainer(learner, TrainConfig(output_dir=None, eval_batch_size=100)).evaluate(test)
    with torch.no_grad():
        logits = learner(test.images)
    y, pred = test.targets, logits.argmax(-1)
    assert metrics["top1"] == pytest.approx(100 * accuracy_score(y, pred), abs=1e-4)
    assert metrics["macro_f1"] == pytest.approx(100 * f1_score(y, pred, average="macro"), abs=1e-4)
    assert metrics["top5"] == pytest.approx(100 * top_k_accuracy_score(y, logits.numpy(), k=5), abs=1e-4)
    assert len(metrics["per_class"]) == len(test.classnames)


def test_ece_by_hand():
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    labels = torch.tensor([0, 1, 1, 1])
    # 2 bins: (0.5, 1] holds all four: confidences .9 .6 .7 .8 (mean .75), accuracy 3/4 -> ECE 0.
    assert promptkit.classification_metrics(logits, labels, n_bins=2)["ece"] == pytest.approx(0, abs=1e-5)
    # 10 bins: |1-.9| + |0-.6| + |1-.7| + |1-.8| over 4 samples.
    assert promptkit.classification_metrics(logits, labels, n_bins=10)["ece"] == pytest.approx(30.0, abs=1e-4)


def dassl_lrs(lr, epochs, warmup_epochs, warmup_lr):
    """Per-epoch learning rates of Dassl's scheduler, transcribed: torch's CosineAnnealingLR(T_max=epochs) as
    the successor of a ConstantWarmupScheduler that steps it only once the warm-up is over (WARMUP_RECOUNT)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epochs))
    last_epoch, lrs = 0, []
    for epoch in range(epochs):
        lrs.append(warmup_lr if last_epoch < warmup_epochs else optimizer.param_groups[0]["lr"])
        optimizer.step()
        if last_epoch >= warmup_epochs:  # Dassl's _BaseWarmupScheduler.step
            cosine.step()
        last_epoch += 1
    return lrs


@pytest.mark.parametrize("epochs, warmup", [(5, 1), (10, 1), (50, 1), (8, 3), (6, 0)])
def test_lr_schedule_is_dassls(epochs, warmup):
    trainer = PromptTrainer.__new__(PromptTrainer)
    trainer.config = TrainConfig(epochs=epochs, lr=0.0035, warmup_epochs=warmup, warmup_lr=1e-5)
    ours = [trainer.lr_at(e) for e in range(epochs)]
    assert ours == pytest.approx(dassl_lrs(0.0035, epochs, warmup, 1e-5), rel=1e-9, abs=1e-12)
    if warmup:
        assert ours[warmup] == 0.0035  # the first epoch after the warm-up runs at the full rate


def test_nan_loss_stops_with_step_and_keeps_checkpoint(vit_clip, tmp_path):
    names, data = teacher_task(vit_clip, n=16)
    learner = promptkit.CoOp(vit_clip, names, n_ctx=4)
    config = TrainConfig(epochs=1, batch_size=8, output_dir=str(tmp_path), progress=False)
    PromptTrainer(learner, config).fit(data)
    saved = load_tensors(tmp_path / "checkpoint" / "prompt_weights.safetensors")["ctx"]
    with torch.no_grad():
        learner.ctx.fill_(float("nan"))
    config = TrainConfig(epochs=2, batch_size=8, output_dir=str(tmp_path), progress=False)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 1 "):
        PromptTrainer(learner, config).fit(data)
    assert torch.equal(load_tensors(tmp_path / "checkpoint" / "prompt_weights.safetensors")["ctx"], saved)
    with pytest.warns(UserWarning, match="step skipped"):
        PromptTrainer(learner, TrainConfig(epochs=1, batch_size=8, output_dir=None, progress=False,
                                           nan_policy="skip")).fit(data)


def test_bad_inputs(vit_clip, bench, tmp_path):
    learner = promptkit.CoOp(vit_clip, ["a", "b"], n_ctx=2)
    trainer = PromptTrainer(learner, TrainConfig(output_dir=None, progress=False))
    with pytest.raises(ValueError, match="48 classes but the learner was built for 2"):
        trainer.fit(bench.split("train", shots=1))
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        trainer.fit(data)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"epochz": 1})
    with pytest.raises(ValueError, match="has no prompt parameters"):
        PromptTrainer(promptkit.ZeroShotCLIP(vit_clip, ["a", "b"]), TrainConfig(output_dir=None)).fit(
            torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1])))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_round_trip(tmp_path, suffix):
    config = TrainConfig(epochs=7, lr=0.01, optimizer="adamw", grad_clip=1.0, cache_image_features=False)
    config.save(tmp_path / f"c{suffix}")
    assert TrainConfig.load(tmp_path / f"c{suffix}") == config
    assert config.with_overrides(["lr=0.5", "grad_clip=null", "scheduler=constant"]) == TrainConfig(
        epochs=7, lr=0.5, optimizer="adamw", grad_clip=None, cache_image_features=False, scheduler="constant")


def _run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = _run([str(SCRIPT), str(full), "5"])
    victim = _run([str(SCRIPT), str(killed), "5", "--sleep", "1.5"])
    state = killed / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert reference.communicate() and reference.returncode == 0
    done = json.loads(state.read_text())["epoch"]
    assert 2 <= done < 5
    resumed = _run([str(SCRIPT), str(killed), "5", "--resume"])
    output = resumed.communicate()[0].decode()
    assert resumed.returncode == 0, output
    assert f"resumed from {killed / 'checkpoint'}: {done} epochs done" in (killed / "train.log").read_text()
    a = load_tensors(full / "prompts" / "prompt_weights.safetensors")["ctx"]
    b = load_tensors(killed / "prompts" / "prompt_weights.safetensors")["ctx"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method, objectives", [("coop", []), ("prograd", []), ("coop", ["--objectives", "flyp"])])
def test_two_processes_equal_one(tmp_path, method, objectives):
    """Ranks start from different random prompts (seeded by rank): the trainer broadcasts rank 0's, so both
    ranks end identical and equal to one process. ProGrad's projection is applied to the all-reduced
    gradients, and with 2 accumulation steps to the accumulated ones; FLYP's contrastive loss gathers the
    features of both ranks with their gradients."""
    args = ["2", "--method", method, *objectives]
    one = _run([str(SCRIPT), str(tmp_path / "one"), *args])
    accum = _run([str(SCRIPT), str(tmp_path / "accum"), *args, "--accum", "2" if not objectives else "1"])
    port = 29517 + len(method) + 10 * len(objectives)
    two = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                str(SCRIPT), str(tmp_path / "two"), *args])
    for process in (one, accum, two):
        output = process.communicate()[0].decode()
        assert process.returncode == 0, output
    a = load_tensors(tmp_path / "one" / "prompts" / "prompt_weights.safetensors")["ctx"]
    assert not torch.equal(a, torch.zeros_like(a))
    for other in (tmp_path / "two" / "prompts" / "prompt_weights.safetensors", tmp_path / "accum" / "rank0.safetensors"):
        torch.testing.assert_close(load_tensors(other)["ctx"], a, atol=1e-4, rtol=0)
    assert torch.equal(load_tensors(tmp_path / "two" / "rank0.safetensors")["ctx"],
                       load_tensors(tmp_path / "two" / "rank1.safetensors")["ctx"])


def test_resume_refuses_another_run_and_logs_allowed_changes(vit_clip, tmp_path):
    names, data = teacher_task(vit_clip, n=32)
    base = dict(epochs=1, batch_size=8, output_dir=str(tmp_path), progress=False)

    def fit(learner=None, dataset=data, **changes):
        learner = learner or promptkit.CoOp(vit_clip, names, n_ctx=4, seed=0)
        return PromptTrainer(learner, TrainConfig(**{**base, **changes})).fit(dataset, resume=True)

    fit()
    fewer = split(data, 0, 24)
    other_classes = promptkit.CoOp(vit_clip, names[:7] + ["another class"], n_ctx=4, seed=0)
    cases = [(dict(dataset=fewer), "training data: checkpoint 32 images"),
             (dict(seed=2), "seed: checkpoint 1, now 2"),
             (dict(optimizer="adamw"), "optimizer: checkpoint 'sgd', now 'adamw'"),
             (dict(learner=other_classes), "classnames: checkpoint"),
             (dict(learner=promptkit.CoOp(vit_clip, names, n_ctx=2, seed=0)), "hparams: checkpoint"),
             (dict(learner=promptkit.create_learner("kgcoop", vit_clip, names)), "method: checkpoint 'coop', now 'kgcoop'")]
    before = [(tmp_path / name).read_text() for name in ("checkpoint/trainer_state.json", "config.json")]
    for changes, message in cases:
        with pytest.raises(ValueError, match=f"cannot resume the run in .*{message}"):
            fit(**changes)
    assert [(tmp_path / name).read_text() for name in ("checkpoint/trainer_state.json", "config.json")] == before
    fit(epochs=2, eval_every=2)  # more epochs: allowed, and said
    log = (tmp_path / "train.log").read_text()
    assert "resume: epochs changed from 1 to 2" in log and "resumed from" in log
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 2


def test_param_groups_have_their_own_lr_and_warm_up(vit_clip):
    """DPT's recipe: the text context at 0.002 after 1 warm-up epoch, the visual prompts at 0.01 after 10."""
    names = [f"class {i}" for i in range(4)]
    learner = promptkit.create_learner("cavpt", vit_clip, names, n_ctx=2, n_vision=2, top_k=2, seed=0)
    config = TrainConfig(epochs=20, lr=0.01, warmup_epochs=10, output_dir=None, progress=False,
                         param_groups={"ctx": {"lr": 0.002, "warmup_epochs": 1}})
    trainer = PromptTrainer(learner, config)
    optimizer = trainer._optimizer(learner.prompt_parameters())
    by_group = {g["group"]: g for g in optimizer.param_groups}
    assert [id(p) for p in by_group["ctx"]["params"]] == [id(learner.ctx)]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(learner.prompt_parameters())
    assert trainer.lr_at(1, "ctx") == 0.002 and trainer.lr_at(1) == 1e-5 and trainer.lr_at(10) == 0.01
    assert trainer.lr_at(5, "ctx") == pytest.approx(dassl_lrs(0.002, 20, 1, 1e-5)[5])
    with pytest.raises(ValueError, match="param_groups names 'text', which matches none of cavpt's prompts: ctx"):
        PromptTrainer(learner, TrainConfig(output_dir=None, param_groups={"text": {"lr": 0.1}}))._optimizer(
            learner.prompt_parameters())
    with pytest.raises(ValueError, match=r"unknown keys \['momentum'\]"):
        TrainConfig(param_groups={"ctx": {"momentum": 0.5}})


def test_resume_compares_settings_as_saved_and_guards_the_prompt_average(vit_clip, tmp_path):
    """A tuple in the config is a list once saved (still the same run); the Gaussian prompt average is drawn for
    one epoch count, so resuming with another is refused before training."""
    names, data = teacher_task(vit_clip, n=16)
    config = dict(epochs=2, batch_size=8, output_dir=str(tmp_path), progress=False, augment={"crop_scale": (0.5, 1.0)})
    learner = promptkit.create_learner("coop", vit_clip, names, n_ctx=2, seed=0, objectives=["ce", "gpa"])
    with pytest.warns(UserWarning, match="no random op"):
        PromptTrainer(learner, TrainConfig(**config)).fit(data)
        PromptTrainer(learner, TrainConfig(**config)).fit(data, resume=True)  # the same run: accepted
    with pytest.raises(ValueError, match="averaged this run's prompts for 2 epochs; resume it with epochs=2"):
        PromptTrainer(learner, TrainConfig(**{**config, "epochs": 4})).fit(data, resume=True)


def test_whole_batch_objectives_refuse_accumulation(vit_clip):
    names, data = teacher_task(vit_clip, n=16)
    learner = promptkit.create_learner("coop", vit_clip, names, n_ctx=2, objectives=["flyp"])
    with pytest.raises(ValueError, match="objective flyp compares the images of a batch .* grad_accum_steps=1"):
        PromptTrainer(learner, TrainConfig(batch_size=8, grad_accum_steps=2, output_dir=None)).fit(data)

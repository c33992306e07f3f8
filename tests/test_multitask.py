"""Multi-task datasets and learners (task ids through the trainer), and MVLPT (MCoOp / MVPT / MUPT, transfer)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import promptkit
from conftest import assert_unchanged, snapshot
from promptkit.data import MultiTaskDataset

TASKS = {"animals": ["cat", "dog", "car"], "vehicles": ["car", "bus"]}


class Images(Dataset):
    def __init__(self, images, labels, classnames):
        self.images, self.targets, self.classnames = images, [int(y) for y in labels], list(classnames)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def task_data(n=(6, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: Images(torch.randn(k, 3, 32, 32, generator=g), torch.arange(k) % len(names), names)
            for (name, names), k in zip(TASKS.items(), n)}


def test_multitask_dataset_merges_class_names_and_yields_tasks():
    parts = task_data()
    data = MultiTaskDataset(parts)
    assert data.classnames == ["cat", "dog", "car", "bus"]  # "car" is shared: one class, in both tasks
    assert data.tasks == TASKS and data.task_names == ["animals", "vehicles"]
    assert data.targets == [0, 1, 2, 0, 1, 2, 2, 3, 2, 3] and data.task_ids == [0] * 6 + [1] * 4
    image, label, task = data[7]
    assert torch.equal(image, parts["vehicles"][1][0]) and (label, task) == (3, 1)
    assert data.task_labels("vehicles") == [2, 3]


def test_multitask_bad_input_is_refused(vit_clip):
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskDataset({})
    with pytest.raises(ValueError, match="task 'empty' has no classes"):
        MultiTaskDataset({"empty": Images(torch.zeros(1, 3, 32, 32), [0], [])})
    with pytest.raises(ValueError, match="outside \\[0, 2\\)"):
        MultiTaskDataset({"a": Images(torch.zeros(1, 3, 32, 32), [2], ["x", "y"])})
    with pytest.raises(ValueError, match="task 'b' has no classes"):
        promptkit.create_learner("coop", vit_clip, ["cat"], n_ctx=2, tasks={"a": ["cat"], "b": []})
    with pytest.raises(ValueError, match="not among the learner's classnames"):
        promptkit.create_learner("coop", vit_clip, ["cat"], n_ctx=2, tasks={"a": ["cat", "bus"]})
    learner = promptkit.create_learner("coop", vit_clip, ["cat", "dog", "car", "bus"], n_ctx=2, tasks=TASKS)
    with pytest.raises(ValueError, match="task id out of range"):
        learner.task_logits(torch.zeros(2, 4), torch.tensor([0, 2]))
    single = promptkit.create_learner("coop", vit_clip, ["cat", "dog"], n_ctx=2)
    with pytest.raises(ValueError, match="has no tasks"):
        single.task_logits(torch.zeros(1, 2), torch.tensor([0]))
    data = MultiTaskDataset(task_data())
    with pytest.raises(ValueError, match="learner was built without them"):
        promptkit.PromptTrainer(promptkit.create_learner("coop", vit_clip, data.classnames, n_ctx=2),
                                promptkit.TrainConfig(device="cpu")).evaluate(data)


def test_multitask_batch_scoring_equals_per_task_scoring(vit_clip, images):
    """A mixed batch of a multi-task learner = each sample through a learner of its own task, same context."""
    data = MultiTaskDataset(task_data())
    joint = promptkit.create_learner("coop", vit_clip, data.classnames, n_ctx=4, tasks=data.tasks, seed=3)
    per_task = {}
    for name, names in TASKS.items():
        per_task[name] = promptkit.create_learner("coop", vit_clip, names, n_ctx=4, seed=99)
        per_task[name].init_from(joint)
    task = torch.tensor([0, 1, 1])
    labels = torch.tensor([1, 3, 2])  # dog (animals), bus and car (vehicles), in merged labels
    out = joint.training_loss(labels, images, task=task)
    expected_logits, expected_ce = [], []
    for i, t in enumerate(task.tolist()):
        name = data.task_names[t]
        logits = per_task[name](images[i:i + 1])
        local = data.tasks[name].index(data.classnames[labels[i]])
        torch.testing.assert_close(out.logits[i, data.task_labels(name)], logits[0], atol=1e-5, rtol=1e-5)
        expected_logits.append(logits)
        expected_ce.append(F.cross_entropy(logits, torch.tensor([local])))
        others = [c for c in range(len(data.classnames)) if c not in data.task_labels(name)]
        assert (out.logits[i, others] == torch.finfo(torch.float32).min).all()
    torch.testing.assert_close(out.loss, torch.stack(expected_ce).mean(), atol=1e-5, rtol=1e-5)


def test_one_task_mvlpt_text_is_coop(vit_clip, classnames, images):
    """MCoOp with one task: CoOp with 16 context tokens around the class name, same init, same logits and loss."""
    labels = torch.tensor([0, 4, 2])
    mcoop = promptkit.create_learner("mvlpt", vit_clip, classnames, prompt="text", seed=5,
                                     tasks={"only": classnames})
    coop = promptkit.create_learner("coop", vit_clip, classnames, n_ctx=16, class_token_position="middle", seed=5)
    assert torch.equal(mcoop.ctx, coop.ctx)
    torch.testing.assert_close(mcoop(images), coop(images), atol=0, rtol=0)
    one = mcoop.training_loss(labels, images, task=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(one.loss, coop.training_loss(labels, images).loss, atol=1e-6, rtol=0)


def test_mvpt_image_features_match_a_transcription(vit_clip, classnames, images):
    """MVPT as the authors' ImageEncoder: tokens after ln_pre, deep tokens replacing them at each later block."""
    learner = promptkit.create_learner("mvlpt", vit_clip, classnames, prompt="visual", n_vision=3, seed=1)
    with torch.no_grad():
        learner.vision.normal_()
        visual, n = vit_clip.model.visual, 3
        x = visual._embeds(images)
        x = torch.cat([x[:, :1], learner.vision[0].expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for i, block in enumerate(visual.transformer.resblocks):
            if i:
                x = torch.cat([x[:, :1], learner.vision[i].expand(len(x), -1, -1), x[:, 1 + n:]], dim=1)
            x = block(x) if visual.transformer.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        expected = F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)
        torch.testing.assert_close(learner.encode_image(images), expected, atol=1e-5, rtol=1e-5)
        text = vit_clip.zero_shot_text_features(classnames, ["a photo of a {}."])
        torch.testing.assert_close(learner.text_features(), text, atol=0, rtol=0)
    assert learner.vision.shape == (len(vit_clip.vision_blocks), 3, vit_clip.vision_width)


def test_mupt_projection_is_the_code_s_per_token_block(vit_clip, classnames):
    learner = promptkit.create_learner("mvlpt", vit_clip, classnames, prompt="unified", project_dim=16, seed=2)
    proj = learner.projection
    ctx, vision = learner.ctx.detach(), learner.vision.detach()
    with torch.no_grad():
        got_ctx, got_vision = learner.prompts()
        tokens = torch.cat([proj.text_in(ctx), proj.vision_in(vision.flatten(0, 1))])
        h = proj.ln_1(tokens)  # one token per sequence: attention returns out_proj(v_proj(token))
        w_v, b_v = proj.attn.in_proj_weight[32:], proj.attn.in_proj_bias[32:]
        x = tokens + F.linear(F.linear(h, w_v, b_v), proj.attn.out_proj.weight, proj.attn.out_proj.bias)
        m = proj.mlp
        u = m[0](proj.ln_2(x))
        x = x + m[2](u * torch.sigmoid(1.702 * u))
        torch.testing.assert_close(got_ctx, proj.text_out(x[:len(ctx)]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_vision, proj.vision_out(x[len(ctx):]).view_as(vision), atol=1e-5, rtol=1e-5)
    assert got_ctx.shape == (4, vit_clip.text_width) and got_vision.shape == vision.shape == (
        len(vit_clip.vision_blocks), 4, vit_clip.vision_width)


@pytest.mark.parametrize("prompt", ["text", "visual", "unified"])
def test_multitask_source_transfers_to_the_target(prompt, vit_clip, tmp_path):
    """A source trained on two tasks (one shared prompt); the target starts exactly from it."""
    before = snapshot(vit_clip)
    source_data = MultiTaskDataset(task_data())
    source = promptkit.create_learner("mvlpt", vit_clip, source_data.classnames, prompt=prompt, n_ctx=4 if
                                      prompt != "visual" else None, n_vision=2 if prompt != "text" else None,
                                      tasks=source_data.tasks, seed=0)
    config = promptkit.TrainConfig(epochs=2, batch_size=5, lr=0.05, device="cpu", output_dir=None, progress=False,
                                   log_every=0, optimizer="adamw")
    start = {k: v.clone() for k, v in source.prompt_state_dict().items()}
    promptkit.PromptTrainer(source, config).fit(source_data)
    assert any(not torch.equal(start[k], v) for k, v in source.prompt_state_dict().items())
    source.save_pretrained(tmp_path / "source")
    target_names = ["red square", "blue circle"]
    for origin in (source, tmp_path / "source"):
        target = promptkit.create_learner("mvlpt", vit_clip, target_names, prompt=prompt, n_ctx=4 if
                                          prompt != "visual" else None, n_vision=2 if prompt != "text" else None,
                                          seed=7)
        target.init_from(origin)
        for key, value in source.prompt_state_dict().items():
            assert torch.equal(target.prompt_state_dict()[key], value), key
    # The trainer starts from the transferred prompts: with a zero learning rate they stay exactly so.
    frozen = promptkit.TrainConfig(epochs=1, batch_size=2, lr=0.0, warmup_lr=0.0, weight_decay=0.0, device="cpu",
                                   output_dir=None, progress=False, log_every=0)
    target_data = Images(torch.randn(4, 3, 32, 32), [0, 1, 0, 1], target_names)
    promptkit.PromptTrainer(target, frozen).fit(target_data)
    for key, value in source.prompt_state_dict().items():
        assert torch.equal(target.prompt_state_dict()[key], value), key
    assert_unchanged(vit_clip, before)


def test_init_from_refuses_other_prompts(vit_clip, classnames):
    text = promptkit.create_learner("mvlpt", vit_clip, classnames, prompt="text", n_ctx=4)
    with pytest.raises(ValueError, match="cannot initialise a mvlpt learner from coop"):
        text.init_from(promptkit.create_learner("coop", vit_clip, classnames, n_ctx=4))
    with pytest.raises(ValueError, match="do not fit"):
        text.init_from(promptkit.create_learner("mvlpt", vit_clip, classnames, prompt="visual", n_vision=2))
    with pytest.raises(ValueError, match="prompt must be one of"):
        promptkit.create_learner("mvlpt", vit_clip, classnames, prompt="both")


@pytest.mark.parametrize("cache", [True, False])
def test_trainer_learns_a_multitask_toy(cache, vit_clip, tmp_path):
    """Labels from a multi-task teacher with other prompts; the cached-feature path and the image path both
    learn, per-task evaluation included, and the multi-task learner saves and loads."""
    method, kwargs = "coop", dict(n_ctx=4)
    parts = task_data(n=(24, 16), seed=1)
    data = MultiTaskDataset(parts)
    torch.manual_seed(0)
    teacher = promptkit.create_learner(method, vit_clip, data.classnames, tasks=data.tasks, **kwargs)
    with torch.no_grad():
        for p in teacher.prompt_parameters():
            p.normal_(0, 1)
        images = torch.stack([data[i][0] for i in range(len(data))])
        labels = teacher.task_logits(teacher(images), torch.tensor(data.task_ids)).argmax(-1)
    for name, part in parts.items():  # relabel each task's samples with the teacher's (task-local) labels
        own = [i for i, t in enumerate(data.task_ids) if data.task_names[t] == name]
        part.targets = [data.tasks[name].index(data.classnames[labels[i]]) for i in own]
    data = MultiTaskDataset(parts)
    learner = promptkit.create_learner(method, vit_clip, data.classnames, tasks=data.tasks, seed=1, **kwargs)
    config = promptkit.TrainConfig(epochs=12, batch_size=8, lr=0.05, optimizer="adamw", warmup_epochs=0,
                                   device="cpu", output_dir=None, progress=False, log_every=0,
                                   cache_image_features=cache)
    trainer = promptkit.PromptTrainer(learner, config)
    trainer.fit(data)
    losses = [h["train_loss"] for h in trainer.history]
    assert losses[-1] < 0.6 * losses[0], losses
    metrics = trainer.evaluate(data)
    assert set(metrics["per_task"]) == set(TASKS) and metrics["top1"] > 75
    learner.save_pretrained(tmp_path)
    loaded = promptkit.load_pretrained(tmp_path, vit_clip)
    assert loaded.tasks == data.tasks
    assert promptkit.PromptTrainer(loaded, config).evaluate(data)["top1"] == metrics["top1"]


def test_cli_train_starts_from_a_source(vit_clip, tmp_path):
    from promptkit.checkpoint import load_tensors
    from promptkit.cli import main

    source = promptkit.create_learner("mvlpt", vit_clip, ["cat", "dog", "car", "bus"], n_ctx=4, tasks=TASKS, seed=4)
    source.save_pretrained(tmp_path / "source")
    out = tmp_path / "target"
    assert main(["train", "--arch", "test-vit", "--data", "procedural", "--classes", "novel", "--shots", "1",
                 "--protocol", "few-shot", "--method", "mvlpt", "--init-from", str(tmp_path / "source"), "--out",
                 str(out), "epochs=1", "n_ctx=4", "lr=0", "warmup_lr=0", "weight_decay=0", "progress=false"]) == 0
    assert torch.equal(load_tensors(out / "prompts" / "prompt_weights.safetensors")["ctx"], source.ctx.detach())
    assert main(["train", "--arch", "test-vit", "--data", "procedural", "--classes", "novel", "--shots", "1",
                 "--method", "coop", "--init-from", str(tmp_path / "source"), "--out", str(tmp_path / "x"),
                 "n_ctx=4"]) == 2

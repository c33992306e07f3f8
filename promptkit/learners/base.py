"""PromptLearner: what every method is, and the one interface the trainer and adapters use."""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .._keywords import record_keywords
from ..clip import FrozenCLIP
from ..objectives import TrainOutputs


@dataclass
class LossOutput:
    """What `training_loss` returns: `loss` is what the trainer backpropagates, `logits` feed
    the running accuracy, `terms` are detached scalars for the log (e.g. `ce`, `kg`).

    A gradient rule that is not linear in the batch (ProGrad's projection) returns its losses as
    `gradient_terms` instead: the trainer then accumulates each term's gradient over micro-batches,
    averages it over processes, and calls the learner's `combine_gradients` once per step, so the rule
    sees the whole batch's gradients whatever the accumulation or number of processes. `loss` is then
    only logged and checked for finiteness.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient_terms: dict[str, torch.Tensor] | None = None


class PromptLearner(nn.Module):
    """Base of every method. A learner owns its prompt tensors and reads a shared `FrozenCLIP`.

    Subclasses override `text_features` (text side) and/or `encode_image` (image side); losses are
    objectives (`promptkit.objectives`) that read the learner's `training_outputs`. Set
    `image_prompted = True` when the image path carries prompts: the trainer then never caches image
    features for it. Set `batch_dependent = True` when an image's prediction depends on the other images of its
    batch (DPL's prompt is generated from the whole batch): test-time adapters, which answer image by image,
    then refuse the learner.

    Every constructor keyword is recorded in `hparams` (a subclass must spell its keywords out: no
    `**kwargs`), so `save_pretrained` / `load_pretrained` rebuild the method without further code.
    Every learner also takes:
        seed: the random initialisation of its prompts (and of any layers it owns) is drawn from this
            seed, leaving the caller's random state untouched (kept in `init_seed`); without it, from the
            global generator.
        objectives: replaces the method's objectives: names, `(name, {keywords})` or `Objective`
            instances, e.g. `["ce", ("kgcoop", {"weight": 8.0})]`; saved and rebuilt with the learner.
        head: the classifier (LP-FT, Kumar et al., ICLR 2022). "text" (default): the method's own, image
            features against class text features. "zeroshot": a trainable linear head (`head.weight` [C, D],
            `head.bias` [C]) replacing the text classifier, initialised from the zero-shot classifier (logit
            scale x hand-crafted text features of the learner's `templates`, else "a photo of a {}.").
            "linear-probe": the same head, first fitted by `fit` as CLIP's linear probe (scikit-learn, C
            searched on validation, `promptkit.learners.heads.fit_linear_probe`) on the features the learner's
            image path gives at initialisation (stage 1, LP), then trained with the prompts (stage 2, FT);
            `PromptTrainer.fit` runs both. Logits are then `normalised image features @ head.weight.T +
            head.bias`; the text prompts of text-side methods no longer reach the logits (only objectives that
            read text features see them).
        tasks: multi-task training (`set_tasks`): task name -> its class names, all among `classnames`
            (`MultiTaskDataset.tasks`); saved and rebuilt with the learner.
    """

    method: str = ""
    image_prompted: bool = False
    batch_dependent: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        record_keywords(cls, "hparams", extra=_construct)

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str]):
        super().__init__()
        if not isinstance(clip, FrozenCLIP):
            raise TypeError(f"expected a promptkit.FrozenCLIP, got {type(clip).__name__}; wrap an open_clip "
                            f"model with promptkit.FrozenCLIP(model) or use promptkit.load_clip(...)")
        self.clip = clip
        self.classnames = check_classnames(classnames)
        self.hparams: dict = {}
        self.init_seed: int | None = None
        self.objectives = nn.ModuleList()
        self.head: LinearHead | None = None
        self.tasks: dict[str, list[str]] | None = None

    def set_objectives(self, items) -> None:
        """Builds and attaches the objectives (names, `(name, {keywords})` or instances)."""
        from ..registry import create_objective

        objectives = [create_objective(item) for item in items]
        if not objectives:
            raise ValueError("a learner needs at least one objective, e.g. ['ce']")
        rules = [o.name for o in objectives if o.gradient_rule]
        if len(rules) > 1:
            raise ValueError(f"at most one gradient rule per learner, got {rules}")
        for objective in objectives:
            objective.attach(self)
        self.objectives = nn.ModuleList(objectives).to(self.clip.device)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    # -- multi-task ----------------------------------------------------------------------------
    def set_tasks(self, tasks) -> None:
        """Makes this a multi-task learner: `tasks` maps each task name to its class names, all among
        `classnames` (e.g. `MultiTaskDataset.tasks`). The prompts stay shared; each sample is then scored
        against its own task's classes (`task_logits`).

        Raises:
            ValueError: no tasks, a task with no classes, or a class name that is not in `classnames`.
        """
        if not hasattr(tasks, "items") or not tasks:
            raise ValueError("tasks must map each task name to its class names, e.g. dataset.tasks of a "
                             "promptkit.data.MultiTaskDataset")
        index = {name: i for i, name in enumerate(self.classnames)}
        mask = torch.zeros(len(tasks), self.n_classes, dtype=torch.bool)
        checked = {}
        for t, (task, names) in enumerate(tasks.items()):
            if isinstance(names, (str, bytes)) or len(names) == 0:
                raise ValueError(f"task {task!r} has no classes; give every task the list of its class names")
            names = check_classnames(names)
            missing = [name for name in names if name not in index]
            if missing:
                raise ValueError(f"task {task!r} names classes that are not among the learner's classnames: "
                                 f"{missing[:5]}; build the learner with the merged class names of all tasks "
                                 f"(MultiTaskDataset.classnames)")
            mask[t, [index[name] for name in names]] = True
            checked[str(task)] = names
        self.tasks = checked
        self.register_buffer("task_mask", mask.to(self.clip.device), persistent=False)

    @property
    def task_names(self) -> list[str] | None:
        return None if self.tasks is None else list(self.tasks)

    def task_logits(self, logits: torch.Tensor, task) -> torch.Tensor:
        """`logits` [B, C] scored per task: the classes outside each sample's task (`task` [B], indices into
        `task_names`) get the lowest float, so softmax, cross-entropy and argmax see only the task's classes
        (exactly a learner built on that task alone, with the same prompts).

        Raises:
            ValueError: a learner built without tasks, or a task id out of range.
        """
        if self.tasks is None:
            raise ValueError(f"task ids were given but this {self.method or type(self).__name__} learner has no "
                             f"tasks; build it with tasks=dataset.tasks (a promptkit.data.MultiTaskDataset)")
        task = torch.as_tensor(task, device=logits.device).long()
        if task.numel() and (int(task.min()) < 0 or int(task.max()) >= len(self.tasks)):
            raise ValueError(f"task id out of range: got ids in [{int(task.min())}, {int(task.max())}], the learner "
                             f"has {len(self.tasks)} tasks {self.task_names}")
        return logits.masked_fill(~self.task_mask[task], torch.finfo(logits.dtype).min)

    def init_from(self, source) -> None:
        """Starts this learner's prompts from `source`'s (a learner or a `save_pretrained` directory): every
        learned tensor is copied, the class-dependent token tables are this learner's own. MVLPT's transfer
        of a multi-task source prompt to a target task; any two learners of one prompt type fit.

        Raises:
            ValueError: a different method, or prompts whose names or shapes differ (another prompt type,
                context length or depth, class-specific context for other classes).
        """
        from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_json, load_tensors

        if isinstance(source, PromptLearner):
            method, state = source.method, source.prompt_state_dict()
        else:
            method = load_json(Path(source) / CONFIG_NAME)["method"]
            state = load_tensors(Path(source) / WEIGHTS_NAME)
        if method != self.method:
            raise ValueError(f"cannot initialise a {self.method} learner from {method} prompts; train the source "
                             f"with the same method and prompt keywords")
        self.load_prompt_state_dict(state)

    # -- parameters ----------------------------------------------------------------------------
    def prompt_parameters(self) -> list[nn.Parameter]:
        """The learned tensors: every parameter outside the frozen CLIP."""
        return [p for name, p in self.named_parameters() if not name.startswith("clip.")]

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Learned tensors (and persistent learner buffers) by name: what checkpoints store."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        own = self.prompt_state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = [f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
        if wrong or (strict and (missing or unexpected)):
            raise ValueError(f"prompt weights do not fit this {self.method or type(self).__name__} learner: "
                             f"missing {missing}, unexpected {unexpected}, shape mismatch {wrong}")
        with torch.no_grad():
            for k in own.keys() & state.keys():
                own[k].copy_(state[k])

    # -- forward -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, D] (with this learner's image prompts, if any)."""
        return self.clip.encode_image(images)

    def text_features(self) -> torch.Tensor:
        """Normalised class text features [C, D]."""
        raise NotImplementedError

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        """Scaled cosine logits [B, C] (or the linear `head`'s, see `head=`), in fp32 even under autocast: at
        |logit| ~ 30, bf16's spacing of 0.125 flips near-tied predictions, pseudo-labels and votes."""
        with torch.autocast(image_features.device.type, enabled=False):
            head = getattr(self, "head", None)  # wrappers built without PromptLearner.__init__ have none
            if head is not None:
                return head(image_features)
            return self.clip.logit_scale.float() * image_features.float() @ text_features.float().t()

    def forward(self, images: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None,
                text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C]. Pass `image_features` (from `encode_image`) and/or `text_features`
        (from `text_features()`) to reuse them, e.g. once per evaluation instead of per batch."""
        if image_features is None:
            image_features = self.encode_image(images)
        if text_features is None:
            text_features = self.text_features()
        return self.logits(image_features, text_features)

    # -- training interface --------------------------------------------------------------------
    def training_outputs(self, images: torch.Tensor | None = None, *,
                         image_features: torch.Tensor | None = None) -> TrainOutputs:
        """What the objectives read for a batch: logits, image and class text features (`image_features`
        is given instead of `images` when the trainer serves cached features, never for `image_prompted`
        learners)."""
        if image_features is None:
            image_features = self.encode_image(images)
        text = self.text_features()
        return TrainOutputs(self, self.logits(image_features, text), image_features, text, images)

    def training_loss(self, labels, images: torch.Tensor | None = None, *,
                      image_features: torch.Tensor | None = None, task: torch.Tensor | None = None) -> LossOutput:
        """The sum of the objectives' terms on one batch, every term kept for the log. With `task` (a multi-task
        batch: each sample's task id) the logits are scored per task (`task_logits`) before the objectives."""
        out = self.training_outputs(images, image_features=image_features)
        if task is not None:
            out.logits, out.task = self.task_logits(out.logits, task), task
        terms, rule_terms, additive = {}, None, []
        for objective in self.objectives:
            produced = objective(out, labels)
            clash = terms.keys() & produced.keys()
            if clash:
                raise ValueError(f"objectives name the same loss term {sorted(clash)}; give each its own")
            terms.update(produced)
            if objective.gradient_rule:
                rule_terms = produced
            elif produced:
                additive.append(sum(produced.values()))
        if not terms:
            names = [o.name for o in self.objectives]
            raise ValueError(f"the objectives {names} give no loss term; add one, e.g. 'ce'")
        logged = {k: v.detach() for k, v in terms.items()}
        if rule_terms is None:
            return LossOutput(sum(additive), out.logits, logged)
        rule = next(o for o in self.objectives if o.gradient_rule)
        gradient_terms = dict(rule_terms, **({"_additive": sum(additive)} if additive else {}))
        loss = rule_terms[rule.primary] + sum(t.detach() for t in additive)
        return LossOutput(loss, out.logits.detach(), logged, gradient_terms=gradient_terms)

    def combine_gradients(self, grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        """The gradient of each prompt parameter (order of `prompt_parameters()`) from the whole batch's
        gradients of the `gradient_terms`: the gradient rule's combination, plus the additive objectives'."""
        rule = next(o for o in self.objectives if o.gradient_rule)
        combined = rule.combine_gradients(grads)
        if "_additive" in grads:
            combined = [g + a for g, a in zip(combined, grads["_additive"])]
        return combined

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch (0-based `epoch`), also the first one after a resume."""
        for objective in self.objectives:
            objective.on_epoch_start(self, epoch, epochs)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called by the trainer after each epoch (1-based `epoch`); e.g. prompt averaging."""
        for objective in self.objectives:
            objective.on_epoch_end(self, epoch, epochs)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Writes `prompt_weights.safetensors` (learned tensors only) and `prompt_config.json`."""
        from ..checkpoint import save_pretrained

        save_pretrained(self, directory)

    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier as `logits = image_features @ weight.T + bias` on plain CLIP's normalised image
        features: (logit scale x text features, zeros) here.

        Raises:
            ValueError: the classifier depends on the image: prompts in the image encoder, or logits that are
                not this product (CoCoOp's per-image context, CLIP-Adapter, Tip-Adapter).
        """
        own = type(self)
        if self.image_prompted or any(getattr(own, name) is not getattr(PromptLearner, name)
                                      for name in ("encode_image", "logits", "forward")):
            raise ValueError(f"{self.method or own.__name__}'s classifier depends on the image, so it is not a "
                             f"fixed linear head on CLIP's image features")
        if getattr(self, "head", None) is not None:
            return self.head.weight.detach(), self.head.bias.detach()
        with torch.no_grad():
            weight = self.clip.logit_scale.detach().float() * self.text_features().float()
        return weight, torch.zeros(len(weight), device=weight.device)

    def export_head(self, directory) -> None:
        """Writes the classifier for use without promptkit: `head.safetensors` (`weight` [C, D], `bias` [C]) and
        `head.json` (base model, class names). Logits are `F.normalize(model.encode_image(x), dim=-1) @ weight.T
        + bias` with the plain open_clip model.

        Raises:
            ValueError: the classifier depends on the image (see `linear_head`).
        """
        from ..checkpoint import export_head

        export_head(self, directory)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, classes={self.n_classes}, hparams={self.hparams}"


HEADS = ("text", "zeroshot", "linear-probe")


class LinearHead(nn.Module):
    """A linear classifier on normalised image features: `logits = f @ weight.T + bias` (fp32). `chosen_C` keeps
    the C of the probe that initialised it (NaN otherwise)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = nn.Parameter(bias.detach().float().clone())
        self.register_buffer("chosen_C", torch.tensor(float("nan"), dtype=torch.float64, device=weight.device))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features.float() @ self.weight.t() + self.bias


def _attach_head(learner: PromptLearner, kind: str) -> None:
    """Replaces the text classifier by a `LinearHead` (see `PromptLearner`'s `head=`)."""
    if kind not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
    if kind == "text":
        return
    own = type(learner)
    if own.linear_head is not PromptLearner.linear_head:
        raise ValueError(f"{learner.method or own.__name__} is a linear head already; head={kind!r} applies to the "
                         f"learners that classify with text features (use head='text')")
    clip = learner.clip
    with torch.no_grad():
        text = clip.zero_shot_text_features(learner.classnames, getattr(learner, "templates", None)
                                            or ["a photo of a {}."])
        weight = clip.logit_scale.detach().float() * text.float()
    learner.head = LinearHead(weight, torch.zeros(len(weight), device=weight.device))
    if kind == "linear-probe":
        # An instance attribute, so that only learners with a probe head offer the trainer's `fit` hook (a class
        # method would make the trainer encode every learner's training set first); a bound method, so that
        # copies of the learner fit their own head.
        learner.fit = types.MethodType(_fit_probe_head, learner)


def _fit_probe_head(self, features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor | None = None,
                    val_labels: torch.Tensor | None = None) -> None:
    """LP-FT's stage 1: the head becomes CLIP's linear probe fitted on `features` [N, D] (the learner's image
    features at initialisation; normalised) and `labels`, C searched on the validation features; then the
    learner's own `fit`, if its class has one (Tip-Adapter's cache)."""
    from .heads import fit_linear_probe

    weight, bias, C = fit_linear_probe(features, labels, self.n_classes, None, 1000, val_features, val_labels,
                                       method=f"{self.method} with head='linear-probe'")
    with torch.no_grad():
        self.head.weight.copy_(weight)
        self.head.bias.copy_(bias)
        self.head.chosen_C.fill_(C)
    own = getattr(type(self), "fit", None)
    if own is not None:
        own(self, features, labels, val_features, val_labels)


def _construct(self, init, args, kw):
    """Runs a learner's constructor with the keywords every learner takes: `seed`, `objectives`, `tasks` and
    `head`."""
    seed, objectives, tasks = kw.pop("seed", None), kw.pop("objectives", None), kw.pop("tasks", None)
    head = kw.pop("head", "text")
    if seed is None:
        init(*args, **kw)
    else:
        clip = args[0] if args else kw.get("clip")
        device = getattr(clip, "device", torch.device("cpu"))
        # Only the model's GPU: under torchrun, touching every GPU would make a context on each from each rank.
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            init(*args, **kw)
        self.init_seed = seed
    if objectives is not None:
        self.set_objectives(objectives)
        self.hparams["objectives"] = [o.spec() for o in self.objectives]
    elif not len(self.objectives):
        self.set_objectives(["ce"])
    if tasks is not None:
        self.set_tasks(tasks)
        self.hparams["tasks"] = self.tasks
    _attach_head(self, head)
    if head != "text":
        self.hparams["head"] = head


def check_classnames(classnames) -> list[str]:
    """Class names as prompts read them: `_` as a space (CoOp's split files and folder names use `apple_pie`,
    and every official learner tokenises `name.replace("_", " ")`), surrounding spaces removed.

    Raises:
        TypeError: a single string (it would become one class per character).
        ValueError: no names, an empty name, or two names that read the same.
    """
    if isinstance(classnames, (str, bytes)):
        raise TypeError(f"classnames must be a list of class names in label order, not the string {classnames!r}; "
                        f"e.g. ['cat', 'dog']")
    names = [" ".join(str(c).replace("_", " ").split()) for c in classnames]
    if not names:
        raise ValueError("classnames is empty: pass the list of class names, in label order")
    empty = [i for i, name in enumerate(names) if not name]
    if empty:
        raise ValueError(f"class names at labels {empty[:5]} are empty; give every class a name")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"labels {seen[name]} and {i} have the same class name {name!r}; class names must be "
                             f"distinct (prompts could not tell them apart)")
        seen[name] = i
    return names



"""Objectives: loss terms and gradient rules as objects, so that any loss goes with any learner.

A learner computes its `TrainOutputs` for a batch once; each of its objectives reads them and returns named,
weighted loss terms; the learner sums them (`PromptLearner.training_loss`) and the trainer logs every term.
A method is a prompt type plus objectives: `kgcoop` = CoOp's context + `ce` + `kgcoop`, `promptsrc` = IVLP's
prompts + `ce` + `promptsrc` + `gpa`, `prograd` = CoOp + the `prograd` gradient rule, `cavpt` = its prompts +
`dpt`. `create_learner(method, clip, classnames, objectives=[...])` combines any of them with any learner.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._keywords import record_keywords


@dataclass
class TrainOutputs:
    """What a learner computed for one training batch, for its objectives to read.

    Attributes:
        learner: the learner.
        logits: [B, C] fp32.
        image_features: [B, D] normalised, with the learner's image prompts.
        text_features: [C, D] normalised class text features (None for learners whose class text depends on
            the image, e.g. CoCoOp; `class_text_features()` then gives the learner's class-level summary).
        images: the batch's images (None when the trainer serves cached image features).
        extras: method-specific outputs (CAVPT: `class_aware_logits`, `top`, `handcrafted_text`).
        task: each sample's task id in a multi-task batch (`logits` are then scored per task), else None.
    """

    learner: nn.Module
    logits: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor | None
    images: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    frozen: torch.Tensor | None = None
    task: torch.Tensor | None = None

    def frozen_image_features(self) -> torch.Tensor:
        """Frozen CLIP's normalised image features of the batch (no prompts, no grad), computed once."""
        if self.frozen is None:
            if not self.learner.image_prompted:  # the learner's own features are frozen CLIP's
                self.frozen = self.image_features.detach()
            elif self.images is None:
                raise ValueError("this objective needs frozen CLIP's image features, but the batch came as cached "
                                 "features of a prompted image path")
            else:
                with torch.no_grad():
                    self.frozen = self.learner.clip.encode_image(self.images)
        return self.frozen

    def class_text_features(self) -> torch.Tensor:
        """[C, D] class text features: `text_features`, or the learner's `text_features()` when it has none."""
        return self.text_features if self.text_features is not None else self.learner.text_features()


class Objective(nn.Module):
    """Base of every objective. Subclasses implement `forward(out, labels) -> {name: weighted term}`;
    constants built from the frozen model (hand-crafted text features, ...) are made in `attach`, once.
    Every constructor keyword is recorded in `config`, so learners save and rebuild their objectives.

    A gradient rule (`gradient_rule = True`, e.g. ProGrad) returns the terms whose gradients it combines, and
    implements `combine_gradients`; the trainer hands it the whole batch's gradients of each term (accumulated
    over micro-batches and averaged over processes). `primary` names the term reported as its loss.
    """

    name: str = ""
    gradient_rule: bool = False
    primary: str = ""
    whole_batch: bool = False  # compares a batch's images with each other: no gradient accumulation (FLYP)
    needs_labels: bool = True  # False: reads no label, so the trainer may serve it unlabelled images (POUF)
    needs_images: bool = False  # reads `out.images` (an attack): the trainer never serves cached features
    uses_dataset: bool = False  # `prepare` gets the training set's frozen image features before training (UPL)
    config: dict = {}  # replaced per instance by the recorded keywords of objectives that take any

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        record_keywords(cls, "config")

    def attach(self, learner) -> None:
        """Builds what the objective needs from `learner` (its frozen CLIP, class names, prompts)."""

    def forward(self, out: TrainOutputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def combine_gradients(self, grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        raise NotImplementedError

    def prepare(self, learner, features: torch.Tensor) -> None:
        """Called by the trainer before the first epoch with frozen CLIP's image features [N, D] of the whole
        training set, when the objective defines `uses_dataset = True` (UPL's per-class selection)."""

    def on_epoch_start(self, learner, epoch: int, epochs: int) -> None:
        """Before each epoch (0-based), also the first one after a resume."""

    def on_epoch_end(self, learner, epoch: int, epochs: int) -> None:
        """After each epoch (1-based)."""

    def spec(self) -> list:
        """`[name, keywords]`: what a config file stores to rebuild this objective."""
        return [self.name, dict(self.config)]

    def extra_repr(self) -> str:
        return f"{self.name}, {self.config}"


from . import (adversarial, counterfactual, regularisers, robust, unsupervised,  # noqa: E402,F401
               variational)  # (registers the built-in objectives)

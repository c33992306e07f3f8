"""Objectives of the robust fine-tuning papers, for prompts: FLYP and CAR-FT."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..registry import register_objective
from ..templates import IMAGENET_TEMPLATES
from ..training import distributed
from . import Objective


@register_objective("flyp")
class FLYP(Objective):
    """FLYP (Goyal et al., "Finetune like you pretrain", CVPR 2023): CLIP's symmetric contrastive loss between
    the batch's image features and the text features of each image's class prompt, as the official code does
    (locuslab/FLYP): the text batch has one row per image, duplicates of a class included (they are negatives
    of each other), labels are the diagonal, CE averaged over both directions, CLIP's (frozen) logit scale.
    Under torchrun the features of every rank are gathered with their gradient (open_clip's
    `ClipLoss(gather_with_grad=True)`), so the loss is the global batch's, as one process computes it.
    The official code uses no cross-entropy beside it: `objectives=["flyp"]`."""

    whole_batch = True

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, out, labels):
        image = distributed.gather_with_grad(out.image_features.float())
        text = distributed.gather_with_grad(out.class_text_features()[labels].float())
        logits = out.learner.clip.logit_scale.float() * image @ text.t()
        target = torch.arange(len(logits), device=logits.device)
        return {"flyp": self.weight * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2}


@register_objective("carft")
class CARFT(Objective):
    """CAR-FT (Mao et al., "Context-Aware Robust Fine-Tuning", IJCV 2023): `weight` x KL(frozen zero-shot ||
    prompted) of the image's distribution over *context* prompts, so that prompting keeps what CLIP knows about
    an image's context (style, domain) while it learns the classes. One context embedding per template
    (`templates`, default CLIP's 80 ImageNet ones): the template filled with every class name, normalised
    features averaged over the classes and renormalised; distributions are softmax(logit scale x cosine).

    It acts on the image side only: for a learner whose image path carries no prompt the two distributions
    are the same and the term is exactly 0. The authors' code is not public; the context set and the
    direction follow the paper's description, the weight (1.0) is a default to tune.
    """

    def __init__(self, weight: float = 1.0, templates: Sequence[str] = IMAGENET_TEMPLATES):
        super().__init__()
        self.weight, self.templates = weight, list(templates)

    @torch.no_grad()
    def attach(self, learner) -> None:
        clip, names = learner.clip, learner.classnames
        contexts = [F.normalize(clip.encode_text(clip.tokenize([t.format(c) for c in names])).mean(0), dim=-1)
                    for t in self.templates]
        self.register_buffer("contexts", torch.stack(contexts), persistent=False)

    def forward(self, out, labels):
        scale = out.learner.clip.logit_scale.float()
        zero_shot = (scale * out.frozen_image_features().float() @ self.contexts.float().t()).log_softmax(-1)
        prompted = (scale * out.image_features.float() @ self.contexts.float().t()).log_softmax(-1)
        return {"carft": self.weight * F.kl_div(prompted, zero_shot, reduction="batchmean", log_target=True)}

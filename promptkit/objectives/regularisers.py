"""Cross-entropy and the regularisers of the prompt-learning papers, as objectives."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..registry import register_objective
from ..templates import PROMPTSRC_TEMPLATES, dataset_template
from . import Objective, TrainOutputs


@register_objective("ce")
class CrossEntropy(Objective):
    """Cross-entropy of the learner's logits."""

    def forward(self, out: TrainOutputs, labels):
        return {"ce": F.cross_entropy(out.logits.float(), labels)}


@register_objective("kgcoop")
class KgCoOpTerm(Objective):
    """KgCoOp (Yao et al., CVPR 2023): `weight` x (1 - mean cosine(learned class text features, hand-crafted
    ones)), keeping learned prompts close to CLIP's general knowledge. The hand-crafted features use KgCoOp's
    template for `dataset` (its own table; None: "a photo of a {}.") unless `templates` is given."""

    def __init__(self, weight: float = 8.0, dataset: str | None = None, templates: Sequence[str] | None = None):
        super().__init__()
        self.weight, self.templates = weight, list(templates or [dataset_template(dataset, "kgcoop")])

    def attach(self, learner) -> None:
        self.register_buffer("handcrafted", learner.clip.zero_shot_text_features(learner.classnames, self.templates),
                             persistent=False)

    def forward(self, out, labels):
        text = out.class_text_features()
        kg = 1 - F.cosine_similarity(text.float(), self.handcrafted.float(), dim=-1, eps=1e-7).mean()
        return {"kg": self.weight * kg}


@register_objective("prograd")
class ProGradRule(Objective):
    """ProGrad (Zhu et al., ICCV 2023) as a gradient rule: per prompt tensor, when the cross-entropy gradient
    g conflicts with the gradient k of KL(zero-shot || learned) at `temperature` (g . k < 0), the update uses
    g - `weight` (g . k / |k|^2) k, else g. Both gradients are the whole batch's (the trainer accumulates and
    all-reduces them). The zero-shot model uses ProGrad's template for `dataset` unless `templates` is given."""

    gradient_rule, primary = True, "ce"

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, dataset: str | None = None,
                 templates: Sequence[str] | None = None):
        super().__init__()
        self.weight, self.temperature = weight, temperature
        self.templates = list(templates or [dataset_template(dataset, "prograd")])

    def attach(self, learner) -> None:
        self.register_buffer("zero_shot_text", learner.clip.zero_shot_text_features(learner.classnames, self.templates),
                             persistent=False)

    def forward(self, out, labels):
        with torch.no_grad():
            zero_shot = out.learner.logits(out.frozen_image_features(), self.zero_shot_text)
        t, logits = self.temperature, out.logits.float()
        kl = F.kl_div((logits / t).log_softmax(-1), (zero_shot.float() / t).softmax(-1), reduction="batchmean") * t * t
        return {"ce": F.cross_entropy(logits, labels), "kl": kl}

    def combine_gradients(self, grads):
        out = []
        for g, k in zip(grads["ce"], grads["kl"]):
            dot = (g * k).sum()
            if dot < 0:
                g = g - self.weight * dot / k.pow(2).sum().clamp_min(1e-12) * k
            out.append(g)
        return out


@register_objective("promptsrc")
class PromptSRCTerms(Objective):
    """PromptSRC's self-regulating terms (Khattak et al., ICCV 2023), as the official code computes them:
    `text_weight` x L1(learned, frozen class text features) + `image_weight` x L1(prompted, frozen image
    features) + KL(frozen zero-shot || learned logits) summed and divided by B x C. The frozen text target is
    the mean of the *unnormalised* features over PromptSRC's 60 templates (`templates`), normalised once."""

    def __init__(self, text_weight: float = 25.0, image_weight: float = 10.0,
                 templates: Sequence[str] = PROMPTSRC_TEMPLATES):
        super().__init__()
        self.text_weight, self.image_weight, self.templates = text_weight, image_weight, list(templates)

    def attach(self, learner) -> None:
        self.register_buffer("frozen_text", learner.clip.zero_shot_text_features(
            learner.classnames, self.templates, normalize_each=False), persistent=False)

    def forward(self, out, labels):
        text, image, frozen_image = out.class_text_features(), out.image_features, out.frozen_image_features()
        logits = out.logits.float()
        with torch.no_grad():
            zero_shot = out.learner.logits(frozen_image, self.frozen_text).float()
        kl = F.kl_div(logits.log_softmax(-1), zero_shot.log_softmax(-1), reduction="sum",
                      log_target=True) / logits.numel()
        return {"l1_text": self.text_weight * F.l1_loss(text.float(), self.frozen_text.float()),
                "l1_image": self.image_weight * F.l1_loss(image.float(), frozen_image.float()), "kl": kl}


@register_objective("gpa")
class GaussianPromptAggregation(Objective):
    """PromptSRC's Gaussian prompt aggregation: training ends with the average of the prompts after each
    epoch, epoch e weighted by N(e; `mean`, `std`) normalised over the epochs (`mean=None`: 0.75 x epochs).
    Adds no loss term. The running sums are buffers, so a resumed run aggregates exactly."""

    def __init__(self, mean: float | None = None, std: float = 1.0):
        super().__init__()
        self.mean, self.std = mean, std

    def attach(self, learner) -> None:
        for name, p in self._prompts(learner):
            self.register_buffer(f"gpa_{name}", torch.zeros_like(p.detach()))
        self.register_buffer("gpa_weight", torch.zeros((), device=learner.clip.device))
        # The epoch count the weights were drawn for (0: none yet): the sums mean nothing for another one.
        self.register_buffer("gpa_epochs", torch.zeros((), dtype=torch.long, device=learner.clip.device))

    def forward(self, out, labels):
        return {}

    @staticmethod
    def _prompts(learner):
        return [(name.replace(".", "_"), p) for name, p in learner.named_parameters() if not name.startswith("clip.")]

    def weights(self, epochs: int) -> list[float]:
        """Normalised Gaussian weight of each epoch 1..epochs."""
        mean = self.mean if self.mean is not None else 0.75 * epochs
        raw = [math.exp(-((e - mean) ** 2) / (2 * self.std ** 2)) for e in range(1, epochs + 1)]
        return [w / sum(raw) for w in raw]

    def on_epoch_start(self, learner, epoch: int, epochs: int) -> None:
        done = int(self.gpa_epochs)
        if done and done != epochs:
            raise ValueError(f"the Gaussian prompt aggregation has averaged this run's prompts for {done} epochs; "
                             f"resume it with epochs={done}, or start a new run for {epochs}")

    @torch.no_grad()
    def on_epoch_end(self, learner, epoch: int, epochs: int) -> None:
        self.gpa_epochs.fill_(epochs)
        weight = self.weights(epochs)[epoch - 1]
        self.gpa_weight += weight
        for name, p in self._prompts(learner):
            getattr(self, f"gpa_{name}").add_(weight * p)
        if epoch == epochs:  # training ends with the aggregated prompts
            for name, p in self._prompts(learner):
                p.copy_(getattr(self, f"gpa_{name}") / self.gpa_weight)


@register_objective("dpt")
class DPTLoss(Objective):
    """DPT/CAVPT's loss (Xing et al., fanrena/DPT `trainers/DPT.py`): during the first `first_stage_epochs`
    epochs CE(frozen image features vs learned text) + CE(prompted image features vs hand-crafted text) +
    0.1 x CE(full model), then CE(full model); always plus `weight` x CE of the per-layer class-aware
    classifiers on the prompt of the true class when it is among the top K (a batch without one adds nothing;
    the official code gives NaN there). Needs a learner with class-aware prompts (`cavpt`)."""

    def __init__(self, weight: float = 0.3, first_stage_epochs: int = 30):
        super().__init__()
        self.weight, self.first_stage_epochs, self.epoch = weight, first_stage_epochs, 0

    def on_epoch_start(self, learner, epoch: int, epochs: int) -> None:
        self.epoch = epoch

    def forward(self, out, labels):
        if "class_aware_logits" not in out.extras:
            raise ValueError(f"the dpt objective needs class-aware visual prompts (the cavpt learner); "
                             f"{type(out.learner).__name__} has none")
        learner, text = out.learner, out.text_features
        ce = F.cross_entropy(out.logits.float(), labels)
        if self.epoch < self.first_stage_epochs:  # general-knowledge guidance, both branches against CLIP
            terms = {"text_branch": F.cross_entropy(learner.logits(out.frozen_image_features(), text).float(), labels),
                     "image_branch": F.cross_entropy(
                         learner.logits(out.image_features, out.extras["handcrafted_text"]).float(), labels),
                     "ce": 0.1 * ce}
        else:
            terms = {"ce": ce}
        layer_logits, top = out.extras["class_aware_logits"], out.extras["top"]
        if layer_logits is not None:
            hit = top == labels[:, None]                                              # [B, K]
            chosen = layer_logits.permute(0, 2, 1, 3)[hit]                            # [hits, layers, C]
            if len(chosen):
                target = labels[:, None].expand_as(top)[hit].repeat_interleave(chosen.shape[1])
                terms["aux"] = self.weight * F.cross_entropy(chosen.flatten(0, 1).float(), target)
        return terms

"""Objectives that read no label: POUF and self-learning (with UPL's per-class selection), for prompts trained
on unlabelled target images."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..registry import register_objective
from ..training import distributed
from . import Objective

PSEUDO_LABEL_LOSSES = ("hard", "soft", "gce")
TEACHERS = ("current", "zero-shot")


def transport_loss(logits: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """POUF's transport term on a batch: with cost 1 - cosine(image, class text), the expected cost of moving
    each image to the classes (softmax over classes, averaged over images) plus that of moving each class
    prototype to the images (softmax over the batch, averaged over classes)."""
    cost = 1 - similarity
    to_classes = (cost * logits.softmax(dim=1)).sum(1).mean()
    to_images = (cost * logits.softmax(dim=0)).sum(0).mean()
    return to_classes + to_images


def mutual_information_loss(logits: torch.Tensor) -> torch.Tensor:
    """Minus the mutual information between images and predicted classes on a batch: the mean entropy of the
    predictions minus the entropy of their mean, with the official code's 1e-5 / 1e-6 inside the logs."""
    p = logits.softmax(dim=1)
    conditional = -(p * torch.log(p + 1e-5)).sum(1).mean()
    marginal = p.mean(0)
    return conditional + (marginal * torch.log(marginal + 1e-6)).sum()


@register_objective("pouf")
class POUF(Objective):
    """POUF (Tanwisuth et al., "POUF: Prompt-oriented unsupervised fine-tuning for large pre-trained models",
    ICML 2023): on unlabelled target images, `transport_weight` x the transport between the class-text
    prototypes and the batch's image features (`transport_loss`) plus `mi_weight` x minus their mutual
    information (`mutual_information_loss`), as the official code computes them
    (korawat-tanwisuth/POUF, pouf_lvm/examples/pouf/image_classification/pouf.py: `compute_transport_loss`,
    `compute_im_loss`, `--trade-off 1 --lambda-im 0.3`). Both terms compare the images of a batch, so it takes
    whole batches; under torchrun the ranks' logits are gathered with their gradient."""

    whole_batch, needs_labels = True, False

    def __init__(self, transport_weight: float = 1.0, mi_weight: float = 0.3):
        super().__init__()
        self.transport_weight, self.mi_weight = transport_weight, mi_weight

    def forward(self, out, labels):
        logits = distributed.gather_with_grad(out.logits.float())
        similarity = logits / out.learner.clip.logit_scale.float()  # the cosines behind the scaled logits
        return {"transport": self.transport_weight * transport_loss(logits, similarity),
                "mi": self.mi_weight * mutual_information_loss(logits)}


def pseudo_label_loss(logits: torch.Tensor, teacher: torch.Tensor, loss: str = "gce", q: float = 0.8,
                      ) -> torch.Tensor:
    """Per-image loss [B] of `logits` against the pseudo-labels of `teacher` logits (no gradient through them).

    hard: cross-entropy with argmax(teacher). soft: cross-entropy with softmax(teacher). gce: the generalised
    cross-entropy (1 - p_y^q) / q with y = argmax(teacher) (Zhang & Sabuncu 2018; Rusak et al.'s robust choice).
    """
    teacher = teacher.detach().float()
    logits = logits.float()
    if loss == "hard":
        return F.cross_entropy(logits, teacher.argmax(-1), reduction="none")
    if loss == "soft":
        return -(teacher.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    if loss == "gce":
        return (1 - logits.softmax(-1).gather(1, teacher.argmax(-1, keepdim=True)).squeeze(1).pow(q)) / q
    raise ValueError(f"loss must be one of {', '.join(PSEUDO_LABEL_LOSSES)}, got {loss!r}")


def top_k_per_class(probabilities: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UPL's selection: for each class, the `k` images predicted as that class with the highest confidence.

    Args:
        probabilities: [N, C] class probabilities.
        k: images per class (fewer where fewer are predicted as the class).

    Returns:
        `selected` [N] bool, and per class the confidence a prediction needs to be among the top `k` [C] (the
        k-th highest confidence of the class, the lowest where fewer, +inf where none).
    """
    confidence, predicted = probabilities.max(-1)
    selected = torch.zeros(len(probabilities), dtype=torch.bool, device=probabilities.device)
    thresholds = torch.full((probabilities.shape[1],), float("inf"), device=probabilities.device)
    for c in predicted.unique().tolist():
        members = (predicted == c).nonzero().squeeze(1)
        # Stable on ties: of equal confidences the earlier image is chosen.
        order = torch.sort(confidence[members], descending=True, stable=True).indices[:k]
        selected[members[order]] = True
        thresholds[c] = confidence[members[order[-1]]]
    return selected, thresholds


@register_objective("self-learning")
class SelfLearning(Objective):
    """Self-learning on unlabelled target images (Rusak et al., "If your data distribution shifts, use
    self-learning", TMLR 2022; bethgelab/robustness, robusta/selflearning): `weight` x a pseudo-label loss of
    the learner's logits, the pseudo-labels coming from the learner itself at this step (`teacher="current"`,
    their default) or from frozen zero-shot CLIP (`teacher="zero-shot"`, as UPL, Huang et al. 2022). `loss`:
    "hard" (cross-entropy with the argmax), "soft" (cross-entropy with the teacher's softmax, gradient stopped
    at the teacher) or "gce", the generalised cross-entropy with the paper's q = 0.8 (their robust choice).

    With `top_k`, as UPL (tonyhuang2022/UPL, trainers/utils.py `select_top_k_similarity_per_class`, 16 per
    class in its configs), only the `top_k` training images per class that zero-shot CLIP predicts as that
    class with the highest confidence are trained on: the trainer hands the objective the training set's
    frozen image features first (`prepare`), which fix each class's confidence threshold; in a batch an image
    counts when its zero-shot confidence reaches its predicted class's threshold (exactly UPL's set when the
    training images are not augmented; an augmented view is judged on its own confidence). UPL trains CoOp
    with the hard loss on these pseudo-labels: `SelfLearning(loss="hard", teacher="zero-shot", top_k=16)`.

    Args:
        loss: "hard", "soft" or "gce".
        q: GCE's exponent.
        teacher: "current" or "zero-shot".
        top_k: images per class (needs `teacher="zero-shot"`); None: every image.
        templates: the zero-shot teacher's templates (ensembled; default "a photo of a {}.").
        weight: the term's weight.
    """

    needs_labels = False

    def __init__(self, loss: str = "gce", q: float = 0.8, teacher: str = "current", top_k: int | None = None,
                 templates: Sequence[str] = ("a photo of a {}.",), weight: float = 1.0):
        super().__init__()
        if loss not in PSEUDO_LABEL_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(PSEUDO_LABEL_LOSSES)}, got {loss!r}")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {teacher!r}")
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if top_k is not None and teacher != "zero-shot":
            raise ValueError("top_k selects images by zero-shot CLIP's confidence, as UPL: use teacher='zero-shot'")
        self.loss, self.q, self.teacher, self.top_k = loss, q, teacher, top_k
        self.templates, self.weight = list(templates), weight
        self.uses_dataset = top_k is not None

    def attach(self, learner) -> None:
        if self.teacher == "zero-shot":
            self.register_buffer("zero_shot_text", learner.clip.zero_shot_text_features(
                learner.classnames, self.templates), persistent=False)
        self.thresholds = None

    @torch.no_grad()
    def zero_shot_logits(self, learner, image_features: torch.Tensor) -> torch.Tensor:
        return learner.logits(image_features, self.zero_shot_text)

    @torch.no_grad()
    def prepare(self, learner, features):
        if self.top_k is not None:
            probabilities = self.zero_shot_logits(learner, features.to(self.zero_shot_text.device)).softmax(-1)
            self.thresholds = top_k_per_class(probabilities, self.top_k)[1]

    def forward(self, out, labels):
        if self.teacher == "zero-shot":
            teacher = self.zero_shot_logits(out.learner, out.frozen_image_features())
        else:
            teacher = out.logits.detach()
        per_image = pseudo_label_loss(out.logits, teacher, self.loss, self.q)
        if self.top_k is None:
            return {"self_learning": self.weight * per_image.mean()}
        if self.thresholds is None:
            raise ValueError(f"self-learning with top_k={self.top_k} selects from the whole training set: train "
                             f"with PromptTrainer (it calls prepare), or call objective.prepare(learner, features) "
                             f"with the training set's image features first")
        confidence, predicted = teacher.float().softmax(-1).max(-1)
        # The slack absorbs the rounding between the batch's and the whole set's encodings of an image.
        keep = (confidence >= self.thresholds[predicted] - 1e-5).float()
        return {"self_learning": self.weight * (per_image * keep).sum() / keep.sum().clamp_min(1)}

"""CPL: Counterfactual Prompt Learning for Vision and Language Models (He et al., EMNLP 2022)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..objectives import TrainOutputs
from ..registry import register_method
from .cocoop import CoCoOp

# The authors' `mupdate`: the mask is 0.999 x the solver's mask + 0.001 x the learned one, clamped to [0, 1].
SOLVER_MOMENTUM = 0.999


def greedy_counterfactual_mask(factual: torch.Tensor, negative: torch.Tensor, true_text: torch.Tensor,
                               negative_text: torch.Tensor) -> torch.Tensor:
    """The authors' solver (`utils/solver.py`): feature coordinates of `factual` [D] are replaced by `negative`'s
    one at a time, each time the one that most raises the (renormalised) feature's similarity to `negative_text`,
    until the negative class's text scores higher than `true_text`'s (or every coordinate is replaced).

    Returns:
        [D] bool: the replaced coordinates, the sparse counterfactual mask u*.
    """
    x, edited = factual.clone().float(), torch.zeros(len(factual), dtype=torch.bool, device=factual.device)
    negative, true_text, negative_text = negative.float(), true_text.float(), negative_text.float()
    for _ in range(len(x)):
        # Similarity to the negative text after replacing coordinate i, for every i at once.
        dot = x @ negative_text + (negative - x) * negative_text
        norm = (x.square().sum() - x.square() + negative.square()).clamp_min(1e-12).sqrt()
        i = (dot / norm).masked_fill(edited, float("-inf")).argmax()
        x[i], edited[i] = negative[i], True
        if x @ negative_text > x @ true_text:
            break
    return edited


@register_method("cpl")
class CPL(CoCoOp):
    """CoCoOp trained with counterfactuals. For a training image of class y with feature v, the negative class
    y- is the class most similar to y, and v- the image feature of one training image of y-; the
    counterfactual feature is v' = (1 - u) * v + u * v-, u in [0, 1]^D a sparse class-wise mask: the minimal
    set of coordinates whose replacement makes CLIP call the image y- (the authors' greedy solver, run once per
    class on its image in `fit`), plus a learned part, mixed as the authors' code mixes them,
    u = clamp(0.999 u* + 0.001 u_learned, 0, 1) (u* is +1 on the replaced coordinates and -1 elsewhere). The
    `counterfactual` objective then contrasts, for every class prompt t, cos(t, v) against cos(t, v')
    (-log softmax over the pair, averaged over classes), weight 1, and adds 0.07 x ||u||_2 (the authors'
    `control_scale` times the L2 norm of the image's mask): CE + 1 x contrastive + 0.07 x mask norm.

    `fit(features, labels)` (the trainer calls it with the cached training features before the first epoch)
    stores the first training image of each class, as the authors' class-name-to-image table holds one, and
    solves the masks. Prediction is CoCoOp's.

    Differences from the authors' code, where it cannot run as written here: the negative class is the nearest
    class by CLIP's text features of the class names (the authors precompute BERTScore between class names,
    a dependency promptkit does not take); features are CLIP's normalised ones (the authors' solver edits the
    raw features); the mask is per coordinate (the authors' `cfgen` indexes `u[:, y]` against a [1, D]
    feature, which with their batch of 1 applies the mask's first coordinate to every coordinate, contrary to
    the paper); the contrastive term is averaged over the batch (the authors sum it, at batch 1 the same).

    Defaults are CoCoOp's, which CPL trains from: 4 context tokens from "a photo of a"; SGD lr 0.002, batch 1.

    Args:
        n_ctx, ctx_init, init_std, text_batch, checkpoint_text: as CoCoOp.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = None,
                 ctx_init: str | None = "a photo of a", init_std: float = 0.02, text_batch: int = 8,
                 checkpoint_text: bool | str = "auto"):
        super().__init__(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std, text_batch=text_batch,
                         checkpoint_text=checkpoint_text)
        if self.n_classes < 2:
            raise ValueError("CPL contrasts each class with another one: give at least 2 class names")
        device, d = self.ctx.device, clip.embed_dim
        self.mask = nn.Parameter(torch.ones(self.n_classes, d, device=device))
        with torch.no_grad():
            names = clip.zero_shot_text_features(self.classnames, ["{}"])
        similarity = (names @ names.t()).fill_diagonal_(float("-inf"))
        self.register_buffer("negative_class", similarity.argmax(-1), persistent=False)
        self.register_buffer("class_text", names, persistent=False)
        # Filled by `fit`; saved, so a resumed run keeps the images and masks it started with.
        self.register_buffer("class_image", torch.zeros(self.n_classes, d, device=device))
        self.register_buffer("has_image", torch.zeros(self.n_classes, dtype=torch.bool, device=device))
        self.register_buffer("solver_mask", -torch.ones(self.n_classes, d, device=device))
        self.set_objectives(["ce", "counterfactual"])

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor, val_features=None, val_labels=None) -> None:
        """Keeps the first image feature of each class and solves each class's counterfactual mask u* against
        its negative class's image. The validation set is not used."""
        features, labels = features.to(self.class_image.device), labels.to(self.class_image.device)
        for c in range(self.n_classes):
            where = (labels == c).nonzero()
            if len(where):
                self.class_image[c], self.has_image[c] = F.normalize(features[where[0, 0]].float(), dim=-1), True
        for c in range(self.n_classes):
            n = self.negative_class[c]
            if self.has_image[c] and self.has_image[n]:
                edited = greedy_counterfactual_mask(self.class_image[c], self.class_image[n], self.class_text[c],
                                                    self.class_text[n])
                self.solver_mask[c] = edited.float() * 2 - 1

    def counterfactual(self, image_features: torch.Tensor, labels: torch.Tensor):
        """Counterfactual features of a labelled batch.

        Returns:
            (v' [B, D] normalised, the masks u [B, D], valid [B] bool: the images whose negative class has an
            image; the others' rows are their factual features).

        Raises:
            ValueError: `fit` was not called.
        """
        if not bool(self.has_image.any()):
            raise ValueError("CPL builds counterfactuals from one training image per class: call "
                             "learner.fit(image_features, labels) first (PromptTrainer.fit does)")
        negative = self.negative_class[labels]
        mask = (SOLVER_MOMENTUM * self.solver_mask[labels] + (1 - SOLVER_MOMENTUM) * self.mask[labels]).clamp(0, 1)
        valid = self.has_image[negative] & self.has_image[labels]
        mask = mask * valid[:, None]
        v = image_features.float()
        mixed = (1 - mask) * v + mask * self.class_image[negative]
        return F.normalize(mixed, dim=-1), mask, valid

    def training_outputs(self, images=None, *, image_features=None) -> TrainOutputs:
        if image_features is None:
            image_features = self.encode_image(images)
        text = self.image_text_features(image_features)
        with torch.autocast(image_features.device.type, enabled=False):
            logits = self.clip.logit_scale.float() * torch.einsum("bd,bcd->bc", image_features.float(), text.float())
        return TrainOutputs(self, logits, image_features, None, images, extras={"image_text": text})

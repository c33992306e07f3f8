"""CPL's counterfactual objective."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register_objective
from . import Objective


def factual_contrast(text: torch.Tensor, factual: torch.Tensor, counterfactual: torch.Tensor) -> torch.Tensor:
    """The authors' `xloss_compute` per image: for each class text t, -log softmax([cos(t, v), cos(t, v')])[0]
    (no temperature), averaged over the classes.

    Args:
        text: [B, C, D] each image's class text features.
        factual, counterfactual: [B, D] image features v and v'.

    Returns:
        [B] the loss of each image.
    """
    positive = F.cosine_similarity(text, factual[:, None], dim=-1)
    negative = F.cosine_similarity(text, counterfactual[:, None], dim=-1)
    return -torch.stack([positive, negative], -1).log_softmax(-1)[..., 0].mean(-1)


@register_objective("counterfactual")
class CounterfactualContrast(Objective):
    """CPL (He et al., eric-ai-lab/CPL `trainers/cocoopcf.py`): `weight` x the contrast between each image's
    factual feature and its counterfactual under every class prompt (`factual_contrast`), plus `sparsity` x
    the L2 norm of the image's counterfactual mask; both averaged over the images that have a counterfactual.
    Needs a learner that builds counterfactuals and per-image class text (the `cpl` learner)."""

    def __init__(self, weight: float = 1.0, sparsity: float = 0.07):
        super().__init__()
        self.weight, self.sparsity = weight, sparsity

    def forward(self, out, labels):
        build = getattr(out.learner, "counterfactual", None)
        if build is None or "image_text" not in out.extras:
            raise ValueError(f"the counterfactual objective needs a learner that builds counterfactual image "
                             f"features (the cpl learner); {type(out.learner).__name__} does not")
        counterfactual, mask, valid = build(out.image_features, labels)
        if not bool(valid.any()):
            return {}
        text = out.extras["image_text"].float()[valid]
        contrast = factual_contrast(text, out.image_features.float()[valid], counterfactual[valid]).mean()
        return {"cf": self.weight * contrast, "mask": self.sparsity * mask[valid].norm(dim=-1).mean()}

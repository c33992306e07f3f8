"""Zero (Farina et al., NeurIPS 2024): test-time augmentation with a zero-temperature vote, no backward."""
from __future__ import annotations

import torch

from ..registry import register_adapter
from .base import ViewAdapter, select_confident


@register_adapter("zero")
class Zero(ViewAdapter):
    """Keeps the `keep` most confident views (lowest entropy) and takes the majority vote of their
    argmax predictions (softmax at zero temperature). Works on any learner; no gradients.

    Returns log vote shares (with a 1e-6 floor) as logits, so softmax gives the vote distribution.

    Args:
        learner: any learner.
        keep: fraction of views kept (Zero: 0.3).
        n_views: views per image including the original (Zero: 64).
        augment: "crop", "augmix" or "auto".
    """

    def __init__(self, learner, keep: float = 0.3, n_views: int = 64, augment: str = "auto", seed: int = 0):
        super().__init__(learner, n_views, augment, seed)
        self.keep = keep

    @torch.no_grad()
    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        learner = self.learner
        text = learner.text_features()
        b, v = views.shape[:2]
        logits = learner(views.flatten(0, 1), text_features=text).view(b, v, -1)
        selected = select_confident(logits, self.keep)
        votes = torch.gather(logits.argmax(-1), 1, selected)
        shares = torch.zeros(b, logits.shape[-1], device=logits.device).scatter_add_(
            1, votes, torch.ones_like(votes, dtype=torch.float)) / votes.shape[1]
        return (shares + 1e-6).log()

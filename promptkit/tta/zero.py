"""Zero (Farina et al., NeurIPS 2024, "Frustratingly Easy Test-Time Adaptation of Vision-Language Models")."""
from __future__ import annotations

import torch

from .._keywords import renamed
from ..registry import register_adapter
from .base import ViewAdapter, entropy, gather_views


@register_adapter("zero")
class Zero(ViewAdapter):
    """Test-time augmentation at zero temperature, no backward: keep the `selection` most confident views
    (lowest entropy), let each vote for its argmax class, and predict the majority.

    Ties are broken greedily as in the reference code: the discarded views are scanned by confidence,
    most confident first, and the first one whose argmax is a tied class gives that class one more vote.
    If none does (or none was discarded), the original image's logits decide among the tied classes
    (the reference falls back to a discarded view, and its mask there does not pick the tied classes).

    Returns log vote shares as logits, so softmax gives the vote distribution (what ECE sees); classes
    without votes get a 1e-6 floor scaled by the kept views' mean probability, which orders them for top-5.

    Args:
        learner: any learner.
        selection: fraction of views kept (Zero's gamma: 0.3; was `keep`).
        n_views: views per image including the original (Zero: 64).
        augment: "crop" (Zero: random resized crops and flips for every dataset), "augmix" or "auto".
        seed, autocast: see `ViewAdapter`.
    """

    @renamed(keep="selection")
    def __init__(self, learner, selection: float = 0.3, n_views: int = 64, augment: str = "crop", seed: int = 0,
                 autocast: bool = True):
        if not 0 < selection <= 1:
            raise ValueError(f"selection must be in (0, 1], got {selection}")
        super().__init__(learner, n_views, augment, seed, autocast)
        self.selection = selection

    @torch.no_grad()
    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        if views.dim() != 5:
            raise ValueError(f"views must be [B, V, 3, H, W] (view 0 the original image), got {tuple(views.shape)}")
        learner = self.learner
        b, v = views.shape[:2]
        with self.amp():
            logits = learner(views.flatten(0, 1), text_features=self.text_features())
        return self.vote(logits.float().view(b, v, -1))

    def vote(self, logits: torch.Tensor) -> torch.Tensor:
        """Zero's prediction from per-view logits [B, V, C] -> log vote shares [B, C]."""
        b, v, n_classes = logits.shape
        k = max(1, int(v * self.selection))
        order = torch.argsort(entropy(logits), dim=1, stable=True)
        predictions = logits.argmax(-1)                                          # zero temperature: one-hot
        kept = gather_views(predictions, order[:, :k])
        votes = torch.zeros(b, n_classes, device=logits.device).scatter_add_(1, kept, torch.ones_like(kept, dtype=torch.float))
        tied = votes == votes.max(1, keepdim=True).values
        fallback = logits[:, 0].masked_fill(~tied, float("-inf")).argmax(-1, keepdim=True)
        candidates = torch.cat([gather_views(predictions, order[:, k:]), fallback], 1)   # the last is always tied
        first = tied.gather(1, candidates).float().argmax(1, keepdim=True)
        winner = candidates.gather(1, first).squeeze(1)
        votes[torch.arange(b), winner] += (tied.sum(1) > 1).float()
        confidence = gather_views(logits, order[:, :k]).softmax(-1).mean(1)
        return (votes / votes.sum(1, keepdim=True) + 1e-6 * confidence).log()

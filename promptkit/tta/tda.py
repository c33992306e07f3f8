"""TDA (Karmanov et al., CVPR 2024, "Efficient Test-Time Adaptation of Vision-Language Models"):
training-free positive and negative caches of test features."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import register_adapter
from .base import ViewAdapter, entropy, marginal_entropy, select_confident


@register_adapter("tda")
class TDA(ViewAdapter):
    """Streams test images through two caches of image features keyed by pseudo-label. Per image, in
    order, as the reference code:

    1. logits of the learner; with several views (TDA's ImageNet variants: 64 AugMix views), the
       `selection` lowest-entropy views are averaged: mean feature (not renormalised), mean logits,
       mean probabilities, entropy of the mean probabilities;
    2. the positive cache keeps, per predicted class, the `pos_shots` lowest-entropy features;
    3. if the entropy divided by log2(C) lies strictly inside `neg_entropy`, the negative cache keeps,
       per predicted class, the `neg_shots` lowest-entropy features with the mask
       `neg_mask[0] < probabilities < neg_mask[1]`;
    4. logits + pos_alpha * exp(-pos_beta (1 - f.k)) @ one_hot(labels)
              - neg_alpha * exp(-neg_beta (1 - f.k)) @ masks, over the cached features k (the image's
       own feature included, since the caches are updated first).

    Defaults are TDA's ImageNet configuration (one view per image). Caches persist across calls, so
    feed one dataset as one stream and call `reset()` before the next.

    Args:
        learner: any learner (its text side is fixed).
        pos_shots, pos_alpha, pos_beta: positive cache capacity per class and weights (3, 1.0, 8.0).
        neg_shots, neg_alpha, neg_beta: negative cache capacity per class and weights (2, 0.117, 1.0).
        neg_entropy: (low, high) window of normalised entropy for the negative cache (0.2, 0.5).
        neg_mask: (low, high) probability window of the negative mask (0.03, 1.0).
        selection: with several views, the fraction of confident views averaged (0.1).
        n_views: views per image (1; TDA uses 64 on ImageNet-A/V/R/Sketch).
        augment: view augmentation when n_views > 1 (TDA: "augmix").
        seed, autocast: see `ViewAdapter`.
    """

    def __init__(self, learner, pos_shots: int = 3, pos_alpha: float = 1.0, pos_beta: float = 8.0,
                 neg_shots: int = 2, neg_alpha: float = 0.117, neg_beta: float = 1.0,
                 neg_entropy=(0.2, 0.5), neg_mask=(0.03, 1.0), selection: float = 0.1, n_views: int = 1,
                 augment: str = "augmix", seed: int = 0, autocast: bool = True):
        super().__init__(learner, n_views, augment, seed, autocast)
        if pos_shots < 0 or neg_shots < 0:
            raise ValueError("cache capacities pos_shots and neg_shots must be >= 0")
        self.pos_shots, self.pos_alpha, self.pos_beta = pos_shots, pos_alpha, pos_beta
        self.neg_shots, self.neg_alpha, self.neg_beta = neg_shots, neg_alpha, neg_beta
        self.neg_entropy, self.neg_mask, self.selection = tuple(neg_entropy), tuple(neg_mask), selection
        self.reset()

    def reset(self) -> None:
        """Empties both caches: class -> list of (entropy, feature, value), lowest entropy first."""
        self.positive: dict[int, list] = {}
        self.negative: dict[int, list] = {}

    @torch.no_grad()
    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        if views.dim() != 5:
            raise ValueError(f"views must be [B, V, 3, H, W] (view 0 the original image), got {tuple(views.shape)}")
        return self.adapt_features(self.view_features(views))

    @torch.no_grad()
    def adapt_features(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised view features [B, V, D] -> logits [B, C], updating the caches image by image."""
        learner = self.learner
        b, v = features.shape[:2]
        with self.amp():
            logits = learner(image_features=features.flatten(0, 1), text_features=learner.text_features())
        logits = logits.float().view(b, v, -1)
        n_classes = logits.shape[-1]
        out = []
        for f, view_logits in zip(features, logits):                      # a stream: order matters
            if v > 1:
                keep = select_confident(view_logits.unsqueeze(0), self.selection)[0]
                chosen = view_logits[keep]
                feature, sample_logits = f[keep].mean(0), chosen.mean(0)
                probs, ent = chosen.softmax(-1).mean(0), marginal_entropy(chosen.unsqueeze(0))[0]
            else:
                feature, sample_logits = f[0], view_logits[0]
                probs, ent = sample_logits.softmax(-1), entropy(sample_logits)
            label, ent = int(sample_logits.argmax()), float(ent)
            self._update(self.positive, label, ent, feature, None, self.pos_shots)
            if self.neg_entropy[0] < ent / math.log2(n_classes) < self.neg_entropy[1]:  # TDA's normalisation
                mask = ((probs > self.neg_mask[0]) & (probs < self.neg_mask[1])).float()
                self._update(self.negative, label, ent, feature, mask, self.neg_shots)
            final = sample_logits + self.pos_alpha * self._affinity(feature, self.positive, self.pos_beta, n_classes)
            out.append(final - self.neg_alpha * self._affinity(feature, self.negative, self.neg_beta, n_classes))
        return torch.stack(out)

    @staticmethod
    def _update(cache: dict, label: int, ent: float, feature: torch.Tensor, value, capacity: int) -> None:
        """Adds the item if the class has room, else replaces the class's highest-entropy item if this one is lower."""
        if capacity == 0:
            return
        items = cache.setdefault(label, [])
        if len(items) < capacity:
            items.append((ent, feature, value))
        elif ent < items[-1][0]:
            items[-1] = (ent, feature, value)
        items.sort(key=lambda item: item[0])

    @staticmethod
    def _affinity(feature: torch.Tensor, cache: dict, beta: float, n_classes: int) -> torch.Tensor:
        """exp(-beta (1 - feature . keys)) @ values over all cached items ([C]; zeros for an empty cache)."""
        items = [(label, key, value) for label in sorted(cache) for _, key, value in cache[label]]
        if not items:
            return feature.new_zeros(n_classes)
        keys = torch.stack([key for _, key, _ in items])
        values = torch.stack([F.one_hot(torch.tensor(label), n_classes).to(feature) if value is None else value
                              for label, _, value in items])
        return torch.exp(-beta * (1 - keys @ feature)) @ values

"""TDA (Karmanov et al., CVPR 2024): training-free dynamic positive and negative caches."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register_adapter
from .base import entropy, select_confident


@register_adapter("tda")
class TDA(nn.Module):
    """Streams test images through two caches of image features keyed by pseudo-label:
    a positive cache (the `pos_shots` lowest-entropy samples per predicted class) adds
    `pos_alpha * exp(-pos_beta (1 - cos)) @ one_hot`; a negative cache of uncertain samples
    (normalised entropy in `neg_entropy`) subtracts `neg_alpha * exp(-neg_beta (1 - cos)) @ mask`,
    mask = their probabilities inside `neg_mask`. Defaults are TDA's ImageNet settings. Samples are
    processed in order, each seeing the caches including itself (as TDA). Call `reset()` between streams.

    Args:
        learner: any learner (its text features are fixed).
        pos_shots, pos_alpha, pos_beta: positive cache capacity per class and weights (3, 1.0, 8.0).
        neg_shots, neg_alpha, neg_beta: negative cache (2, 0.117, 1.0).
        neg_entropy: (low, high) normalised-entropy window for the negative cache (0.2, 0.5).
        neg_mask: (low, high) probability window of the negative mask (0.03, 1.0).
        selection: with several views per image, the fraction of confident views averaged (0.1).
    """

    def __init__(self, learner, pos_shots: int = 3, pos_alpha: float = 1.0, pos_beta: float = 8.0,
                 neg_shots: int = 2, neg_alpha: float = 0.117, neg_beta: float = 1.0,
                 neg_entropy=(0.2, 0.5), neg_mask=(0.03, 1.0), selection: float = 0.1):
        super().__init__()
        self.learner = learner
        self.pos_shots, self.pos_alpha, self.pos_beta = pos_shots, pos_alpha, pos_beta
        self.neg_shots, self.neg_alpha, self.neg_beta = neg_shots, neg_alpha, neg_beta
        self.neg_entropy, self.neg_mask, self.selection = tuple(neg_entropy), tuple(neg_mask), selection
        self._text = None
        self.reset()

    def reset(self) -> None:
        """Empties both caches (class -> list of (entropy, feature, value))."""
        self.positive: dict[int, list] = {}
        self.negative: dict[int, list] = {}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for images [B, 3, H, W]."""
        return self.adapt_features(self.learner.encode_image(images).unsqueeze(1))

    @torch.no_grad()
    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        b, v = views.shape[:2]
        return self.adapt_features(self.learner.encode_image(views.flatten(0, 1)).view(b, v, -1))

    @torch.no_grad()
    def adapt_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, V, D] (normalised) -> logits [B, C], updating the caches sample by sample."""
        learner = self.learner
        if self._text is None or self._text.device != features.device:
            self._text = learner.text_features()
        text, scale = self._text, learner.clip.logit_scale
        n_classes = text.shape[0]
        out = []
        for f in features:                                             # a stream: order matters
            logits = scale * f @ text.t()                              # [V, C]
            if len(f) > 1:  # TDA: average the confident views
                keep = select_confident(logits.unsqueeze(0), self.selection)[0]
                f = torch.nn.functional.normalize(f[keep].mean(0, keepdim=True), dim=-1)
                log_mean = torch.logsumexp(logits[keep].log_softmax(-1), 0) - math.log(len(keep))
                ent = -(log_mean.exp() * log_mean).sum()
                logits = logits[keep].mean(0, keepdim=True)
            else:
                ent = entropy(logits)[0]
            probs = logits.softmax(-1)[0]
            label = int(logits.argmax())
            normalised = float(ent) / math.log2(n_classes)            # TDA's normalisation, as published
            self._update(self.positive, label, float(ent), f[0], None, self.pos_shots)
            if self.neg_entropy[0] < normalised < self.neg_entropy[1]:
                mask = ((probs > self.neg_mask[0]) & (probs < self.neg_mask[1])).float()
                self._update(self.negative, label, float(ent), f[0], mask, self.neg_shots)
            final = logits[0].clone()
            final += self._cache_logits(f[0], self.positive, self.pos_alpha, self.pos_beta, n_classes)
            final -= self._cache_logits(f[0], self.negative, self.neg_alpha, self.neg_beta, n_classes)
            out.append(final)
        return torch.stack(out)

    @staticmethod
    def _update(cache, label, ent, feature, value, capacity) -> None:
        items = cache.setdefault(label, [])
        if len(items) < capacity:
            items.append((ent, feature, value))
        elif ent < items[-1][0]:
            items[-1] = (ent, feature, value)
        items.sort(key=lambda item: item[0])

    @staticmethod
    def _cache_logits(feature, cache, alpha, beta, n_classes) -> torch.Tensor:
        if not cache:
            return torch.zeros(n_classes, device=feature.device)
        keys, values = [], []
        for label, items in sorted(cache.items()):
            for _, key, value in items:
                keys.append(key)
                values.append(value if value is not None else
                              torch.nn.functional.one_hot(torch.tensor(label), n_classes).float().to(feature.device))
        affinity = torch.stack(keys) @ feature
        return alpha * torch.exp(-beta * (1 - affinity)) @ torch.stack(values)

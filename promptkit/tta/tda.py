"""TDA (Karmanov et al., CVPR 2024, "Efficient Test-Time Adaptation of Vision-Language Models"):
training-free positive and negative caches of test features."""
from __future__ import annotations

import math

import torch

from ..registry import register_adapter
from .base import ViewAdapter, entropy, marginal_entropy, select_confident


class FeatureCache:
    """Per class, the `shots` lowest-entropy (feature, value) pairs seen so far, as dense tensors so that
    an update and a read are a few tensor ops with no host synchronisation.

    `entropy` [C, shots] is inf in empty slots, `keys` [C, shots, D] the features, `values` [C, shots, C]
    the per-item class weights (None: one-hot of the item's class, the positive cache).
    """

    def __init__(self, n_classes: int, shots: int, dim: int, masked: bool, device):
        self.entropy = torch.full((n_classes, shots), math.inf, device=device)
        self.keys = torch.zeros(n_classes, shots, dim, device=device)
        self.values = torch.zeros(n_classes, shots, n_classes, device=device) if masked else None

    def __len__(self) -> int:
        return int(self.entropy.isfinite().sum())

    def add(self, label: torch.Tensor, ent: torch.Tensor, feature: torch.Tensor, value=None,
            admit: torch.Tensor | bool = True) -> None:
        """If `admit`, puts the item in an empty slot of its class, or in place of the class's highest-entropy
        item when its own entropy is strictly lower (TDA's rule)."""
        if self.entropy.shape[1] == 0:
            return
        slot = self.entropy[label].argmax()                       # an empty slot (inf) first
        better = (ent < self.entropy[label, slot]) & admit
        self.entropy[label, slot] = torch.where(better, ent, self.entropy[label, slot])
        self.keys[label, slot] = torch.where(better, feature, self.keys[label, slot])
        if self.values is not None:
            self.values[label, slot] = torch.where(better, value, self.values[label, slot])

    def affinity(self, feature: torch.Tensor, beta: float) -> torch.Tensor:
        """sum over cached items of exp(-beta (1 - feature . key)) * value: [C]."""
        weight = torch.exp(-beta * (1 - self.keys @ feature)) * self.entropy.isfinite()        # [C, shots]
        if self.values is None:
            return weight.sum(1)
        return weight.flatten() @ self.values.flatten(0, 1)


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

    Defaults are TDA's ImageNet configuration (`configs/imagenet.yaml`, one view per image); its other
    datasets change `pos_alpha`/`pos_beta` (e.g. ImageNet-R and -V 1.0/8.0). Caches persist across
    calls, so feed one dataset as one stream and call `reset()` before the next; `stream_state()` /
    `load_stream_state()` save and restore them (`adapt_dataset` resumes a stream from them).

    Args:
        learner: any learner (its text side is fixed).
        pos_shots, pos_alpha, pos_beta: positive cache capacity per class and weights (3, 2.0, 5.0).
        neg_shots, neg_alpha, neg_beta: negative cache capacity per class and weights (2, 0.117, 1.0).
        neg_entropy: (low, high) window of normalised entropy for the negative cache (0.2, 0.5).
        neg_mask: (low, high) probability window of the negative mask (0.03, 1.0).
        selection: with several views, the fraction of confident views averaged (0.1).
        n_views: views per image (1; TDA uses 64 on ImageNet-A/V/R/Sketch).
        augment: view augmentation when n_views > 1 (TDA: "augmix").
        seed, autocast: see `ViewAdapter`.
    """

    episodic = False

    def __init__(self, learner, pos_shots: int = 3, pos_alpha: float = 2.0, pos_beta: float = 5.0,
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
        """Empties both caches (they are allocated by the next image)."""
        self.positive: FeatureCache | None = None
        self.negative: FeatureCache | None = None

    def stream_state(self) -> dict[str, torch.Tensor]:
        """Both caches as tensors (none before the first image)."""
        if self.positive is None:
            return {}
        state = {f"{name}.{field}": getattr(cache, field) for name, cache in
                 (("positive", self.positive), ("negative", self.negative)) for field in ("entropy", "keys")}
        return {**state, "negative.values": self.negative.values}

    def load_stream_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continues from the caches of a `stream_state()`."""
        self.reset()
        if not state:
            return
        device = self.learner.clip.device
        (n_classes, pos_shots, dim), neg_shots = state["positive.keys"].shape, state["negative.keys"].shape[1]
        if (n_classes, pos_shots, neg_shots) != (self.learner.n_classes, self.pos_shots, self.neg_shots):
            raise ValueError(f"TDA caches of {n_classes} classes with {pos_shots}/{neg_shots} shots do not fit this "
                             f"adapter ({self.learner.n_classes} classes, pos_shots={self.pos_shots}, "
                             f"neg_shots={self.neg_shots})")
        self.positive = FeatureCache(n_classes, pos_shots, dim, False, device)
        self.negative = FeatureCache(n_classes, neg_shots, dim, True, device)
        for name, cache in (("positive", self.positive), ("negative", self.negative)):
            for field in ("entropy", "keys", "values"):
                if getattr(cache, field) is not None:
                    getattr(cache, field).copy_(state[f"{name}.{field}"])

    @torch.no_grad()
    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        if views.dim() != 5:
            raise ValueError(f"views must be [B, V, 3, H, W] (view 0 the original image), got {tuple(views.shape)}")
        return self.adapt_features(self.view_features(views))

    @torch.no_grad()
    def adapt_features(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised view features [B, V, D] -> logits [B, C], updating the caches image by image."""
        learner = self.learner
        b, v, dim = features.shape
        logits = learner(image_features=features.flatten(0, 1).float(), text_features=self.text_features())
        logits = logits.float().view(b, v, -1)
        n_classes = logits.shape[-1]
        if self.positive is None:
            self.positive = FeatureCache(n_classes, self.pos_shots, dim, False, features.device)
            self.negative = FeatureCache(n_classes, self.neg_shots, dim, True, features.device)
        out = []
        for f, view_logits in zip(features.float(), logits):             # a stream: order matters
            if v > 1:
                keep = select_confident(view_logits.unsqueeze(0), self.selection)[0]
                chosen = view_logits[keep]
                feature, sample_logits = f[keep].mean(0), chosen.mean(0)
                probs, ent = chosen.softmax(-1).mean(0), marginal_entropy(chosen.unsqueeze(0))[0]
            else:
                feature, sample_logits = f[0], view_logits[0]
                probs, ent = sample_logits.softmax(-1), entropy(sample_logits)
            label = sample_logits.argmax()
            self.positive.add(label, ent, feature)
            low, high = self.neg_entropy
            uncertain = (low < ent / math.log2(n_classes)) & (ent / math.log2(n_classes) < high)  # TDA's normalisation
            mask = ((probs > self.neg_mask[0]) & (probs < self.neg_mask[1])).float()
            self.negative.add(label, ent, feature, mask, admit=uncertain)
            out.append(sample_logits + self.pos_alpha * self.positive.affinity(feature, self.pos_beta)
                       - self.neg_alpha * self.negative.affinity(feature, self.neg_beta))
        return torch.stack(out)

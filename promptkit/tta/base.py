"""What all test-time adapters share: view generation and entropy-based confidence selection."""
from __future__ import annotations

import math

import torch
from torch import nn

from .augment import as_image_batch, make_views


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last dim."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def select_confident(logits: torch.Tensor, selection: float) -> torch.Tensor:
    """Indices [B, K] of the K = int(V * selection) lowest-entropy views of logits [B, V, C] (TPT's rule)."""
    k = max(1, int(logits.shape[1] * selection))
    return torch.argsort(entropy(logits), dim=1, stable=True)[:, :k]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the softmax over views, in log space: logits [B, K, C] -> [B]."""
    log_mean = torch.logsumexp(logits.log_softmax(-1), dim=1) - math.log(logits.shape[1])
    return -(log_mean.exp() * log_mean).sum(-1)


class ViewAdapter(nn.Module):
    """Base of adapters that look at augmented views of each test image."""

    def __init__(self, learner, n_views: int = 64, augment: str = "auto", seed: int = 0):
        super().__init__()
        if n_views < 1:
            raise ValueError("n_views must be >= 1")
        self.learner, self.n_views, self.seed = learner, n_views, seed
        if augment == "auto":  # TPT: plain crops for ImageNet-scale natural shifts, AugMix for fine-grained sets
            augment = "crop" if learner.n_classes >= 200 else "augmix"
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def views(self, images) -> torch.Tensor:
        clip = self.learner.clip
        size = clip.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        images = as_image_batch(images, clip.preprocess, size).to(clip.device)
        mean, std = _normalisation(clip.preprocess)
        return make_views(images, self.n_views, self.augment, self.generator, mean, std)

    def forward(self, images) -> torch.Tensor:
        """Logits [B, C] for PIL images or a preprocessed image tensor [B, 3, H, W]."""
        return self.adapt_views(self.views(images))

    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def view_features(self, views: torch.Tensor) -> torch.Tensor:
        """Image features [B, V, D] of all views, encoded once."""
        b, v = views.shape[:2]
        return self.learner.encode_image(views.flatten(0, 1)).view(b, v, -1)


def _normalisation(preprocess):
    for t in getattr(preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(t.mean), tuple(t.std)
    return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

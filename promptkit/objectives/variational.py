"""The KL term of variational (Bayesian) prompts."""
from __future__ import annotations

import torch

from ..registry import register_objective
from . import Objective


def gaussian_kl_to_standard(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_variance)) || N(0, 1)) per coordinate: (sigma^2 + mean^2 - 1 - log sigma^2) / 2."""
    return 0.5 * (log_variance.exp() + mean.square() - 1 - log_variance)


@register_objective("bayesian-kl")
class BayesianKL(Objective):
    """Bayesian prompt learning's prior term (Derakhshani et al., saic-fi/Bayesian-Prompt-Learning
    `trainers/vpt.py`): `weight` x KL(posterior of the context shift || N(0, I)), the KL averaged over the
    context width (not summed, as the authors' code) and over the batch. Reads the posterior (mean,
    log-variance) [B, W] a learner puts in `extras["posterior"]` (the `bayesian` learner)."""

    def __init__(self, weight: float = 0.001):
        super().__init__()
        self.weight = weight

    def forward(self, out, labels):
        if "posterior" not in out.extras:
            raise ValueError(f"the bayesian-kl objective needs a learner with a distribution over its context (the "
                             f"bayesian learner); {type(out.learner).__name__} has none")
        mean, log_variance = out.extras["posterior"]
        return {"kl": self.weight * gaussian_kl_to_standard(mean.float(), log_variance.float()).mean()}

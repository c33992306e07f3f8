"""Adversarial attacks on a learner, in pixel space: PGD (Madry et al., 2018) as TeCoA's code runs it.

Learners and datasets work on normalised images (`(x - mean) / std`, CLIP's mean and std). An attack budget is
stated for pixels in [0, 1], so the attack undoes the normalisation, perturbs the pixels within the L-inf ball of
radius `eps`, keeps every pixel in [0, 1], and hands the learner the normalised perturbed image.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F

ATTACKS = ("pgd",)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class NotDifferentiableError(ValueError):
    """The learner's logits carry no gradient to the input image, so a gradient attack cannot run."""


def pixel_normalization(clip) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [3, 1, 1] of the model's input normalisation, read from `clip.preprocess` (CLIP's otherwise)."""
    from torchvision import transforms as T

    normalize = next((t for t in getattr(clip.preprocess, "transforms", []) if isinstance(t, T.Normalize)), None)
    mean, std = (normalize.mean, normalize.std) if normalize is not None else (CLIP_MEAN, CLIP_STD)
    return torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


def parse_budget(value) -> float:
    """A budget as a float: a number or a fraction such as "1/255"."""
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction such as 1/255, got {value!r}") from None
    return float(value)


def check_budget(eps: float, steps: int, step_size: float) -> None:
    """Raises a ValueError naming the problem for a budget PGD cannot run with."""
    if not eps >= 0:  # also NaN
        raise ValueError(f"eps must be >= 0 (an L-inf radius on pixels in [0, 1], e.g. 1/255), got {eps}")
    if eps > 1:
        raise ValueError(f"eps {eps} is beyond the pixel range [0, 1]: give it as a fraction of it, e.g. 1/255 "
                         f"(not 1)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")


def pgd(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *,
        eps: float, steps: int, step_size: float, mean: torch.Tensor, std: torch.Tensor, random_start: bool = True,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD on the cross-entropy of `forward(images)`; returns the perturbed images, normalised as given.

    As TeCoA's `attack_pgd`: delta starts uniform in [-eps, eps] (`random_start`, drawn from `generator` on the
    CPU, so a seed gives the same start on any device) or at 0, is clipped so that pixel + delta stays in
    [0, 1], then each step moves delta by `step_size` x sign(gradient), clips it to [-eps, eps] and again to the
    pixel range. All images of the batch are attacked at once; the loss is summed over them, so each image's
    step is its own (the sign makes the scale irrelevant). The learner's parameters get no gradient.

    Args:
        forward: normalised images [B, 3, H, W] -> logits [B, C].
        images: normalised images (the dataset's output).
        labels: true labels [B].
        eps, steps, step_size: the budget, on pixels in [0, 1].
        mean, std: the normalisation [3, 1, 1] (`pixel_normalization(clip)`).

    Raises:
        ValueError: a budget PGD cannot run with.
        NotDifferentiableError: the logits do not depend differentiably on the image.
    """
    check_budget(eps, steps, step_size)
    mean, std = mean.to(images.device, torch.float32), std.to(images.device, torch.float32)
    images = images.detach().float()
    pixels = (images * std + mean).clamp(0, 1)  # bounds only: rounding may put a pixel just outside [0, 1]
    low, high = -pixels, 1 - pixels
    if random_start:
        delta = (torch.rand(images.shape, generator=generator) * 2 - 1).to(images.device) * eps
        delta = torch.maximum(torch.minimum(delta, high), low)
    else:
        delta = torch.zeros_like(images)
    labels = labels.to(images.device)
    for step in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            logits = forward(images + delta / std)
            if not logits.requires_grad:
                raise NotDifferentiableError(_not_differentiable(forward))
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), labels, reduction="sum"), delta,
                                          allow_unused=True)
        if grad is None:
            raise NotDifferentiableError(_not_differentiable(forward))
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = torch.maximum(torch.minimum(delta, high), low)
    # Added in normalised space: a zero delta gives back the very same images (eps 0 is exactly clean).
    return images + delta.detach() / std


def _not_differentiable(forward) -> str:
    owner = getattr(forward, "__self__", None)
    name = getattr(owner, "method", None) or type(owner).__name__ if owner is not None else "the model"
    return (f"{name}'s logits are not differentiable in the input image (computed without gradient, e.g. from "
            f"cached or detached features), so a gradient attack such as PGD cannot run on it; attack a learner "
            f"that encodes the image itself")

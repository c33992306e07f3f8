"""TeCoA's text-guided contrastive adversarial training, as an objective any learner can take."""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import check_budget, pgd, pixel_normalization
from ..registry import register_objective
from . import Objective


@register_objective("tecoa")
class TeCoA(Objective):
    """TeCoA (Mao et al., "Understanding zero-shot adversarial robustness for large-scale models", ICLR 2023):
    `weight` x cross-entropy of the image-to-class-text logits of *adversarial* images, i.e. the contrastive
    loss between each attacked image and the text of every class, which keeps attacked image features next to
    their class's text. The images are attacked against the learner as it is at this step (its prompts
    included), with L-inf PGD in pixel space (`promptkit.attacks.pgd`) on the same cross-entropy; the
    defaults are the budget of the authors' prompt-tuning run (cvlab-columbia/ZSRobust4FoundationModel,
    README: `--train_eps 1 --train_numsteps 2 --train_stepsize 1`, all /255, uniform random start,
    attacks.py). The clean logits are only logged (`train_top1`), as the official loop trains on the
    adversarial images alone.

    Args:
        eps: L-inf radius on pixels in [0, 1].
        steps: PGD steps.
        step_size: PGD step on pixels in [0, 1].
        random_start: start uniform in the eps-ball (the official attack) instead of at the image.
        weight: the term's weight.
    """

    needs_images = True

    def __init__(self, eps: float = 1 / 255, steps: int = 2, step_size: float = 1 / 255, random_start: bool = True,
                 weight: float = 1.0):
        super().__init__()
        check_budget(eps, steps, step_size)
        self.eps, self.steps, self.step_size, self.random_start, self.weight = eps, steps, step_size, random_start, weight

    def attach(self, learner) -> None:
        mean, std = pixel_normalization(learner.clip)
        self.register_buffer("mean", mean.to(learner.clip.device), persistent=False)
        self.register_buffer("std", std.to(learner.clip.device), persistent=False)

    def forward(self, out, labels):
        if out.images is None:
            raise ValueError("tecoa attacks the batch's images, but the batch came as cached image features; train "
                             "with cache_image_features=False")
        learner, text = out.learner, out.text_features
        fixed = None if text is None else text.detach()  # the attack needs no gradient to the prompts
        adversarial = pgd(lambda x: learner(x, text_features=fixed), out.images, labels, eps=self.eps,
                          steps=self.steps, step_size=self.step_size, mean=self.mean, std=self.std,
                          random_start=self.random_start)
        logits = learner(adversarial, text_features=text)
        return {"tecoa": self.weight * F.cross_entropy(logits.float(), labels)}

"""PromptSRC: self-regulating prompts (Khattak et al., ICCV 2023)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..registry import register_method
from ..templates import PROMPTSRC_TEMPLATES
from .base import LossOutput
from .ivlp import IVLP


@register_method("promptsrc")
class PromptSRC(IVLP):
    """IVLP prompts regularised towards frozen CLIP, and averaged over epochs.

    Loss = CE + `text_weight` * L1(learned, frozen text features) + `image_weight` * L1(prompted,
    frozen image features) + KL(frozen zero-shot || learned logits) summed and divided by B x C (the
    paper's L_SCL, as the official code computes it). The frozen text target is the official one: the
    mean of the *unnormalised* text features over PromptSRC's 60 templates (`templates`), normalised once,
    encoded once; it serves both the L1 term and the teacher logits. After training, the prompts are the
    Gaussian-weighted average of the prompts after each epoch (GPA): weight of epoch e is
    N(e; `gpa_mean`, `gpa_std`), normalised over the epochs.

    Defaults are the paper's (base-to-novel, ViT-B/16): 4 text + 4 vision tokens, depth 9, weights 25
    and 10, GPA mean 15 and std 1 for 20 epochs (`gpa_mean=None` uses 0.75 x epochs); SGD lr 0.0025, batch 4.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int = 4, n_vision: int = 4,
                 ctx_init: str | None = "a photo of a", text_depth: int | None = None, vision_depth: int | None = None,
                 text_weight: float = 25.0, image_weight: float = 10.0, gpa_mean: float | None = None,
                 gpa_std: float = 1.0, templates: Sequence[str] = PROMPTSRC_TEMPLATES):
        clip.require_vit("PromptSRC")
        # None: the paper's 9 layers (of 12), or every layer of a shallower model.
        text_depth = min(9, len(clip.text_blocks)) if text_depth is None else text_depth
        vision_depth = min(9, len(clip.vision_blocks)) if vision_depth is None else vision_depth
        super().__init__(clip, classnames, n_ctx, n_vision, ctx_init, text_depth, vision_depth)
        self.text_weight, self.image_weight = text_weight, image_weight
        self.gpa_mean, self.gpa_std = gpa_mean, gpa_std
        self.register_buffer("frozen_text", clip.zero_shot_text_features(self.classnames, list(templates),
                                                                         normalize_each=False), persistent=False)
        # Running Gaussian-weighted sums of the prompts (saved in checkpoints so resuming is exact).
        for name, p in self._prompts():
            self.register_buffer(f"gpa_{name}", torch.zeros_like(p))
        self.register_buffer("gpa_weight", torch.zeros(()))

    def _prompts(self):
        return [(name.replace(".", "_"), p) for name, p in self.named_parameters() if not name.startswith("clip.")]

    def training_loss(self, labels, images=None, *, image_features=None) -> LossOutput:
        text = self.text_features()
        image = self.encode_image(images)
        logits = self.logits(image, text)
        with torch.no_grad():
            frozen_image = self.clip.encode_image(images)
            zero_shot = self.logits(frozen_image, self.frozen_text)
        ce = F.cross_entropy(logits.float(), labels)
        l1_text = self.text_weight * F.l1_loss(text.float(), self.frozen_text.float())
        l1_image = self.image_weight * F.l1_loss(image.float(), frozen_image.float())
        kl = F.kl_div(logits.float().log_softmax(-1), zero_shot.float().log_softmax(-1), reduction="sum",
                      log_target=True) / logits.numel()
        loss = ce + l1_text + l1_image + kl
        return LossOutput(loss, logits, {"ce": ce.detach(), "l1_text": l1_text.detach(),
                                         "l1_image": l1_image.detach(), "kl": kl.detach()})

    def gpa_weights(self, epochs: int) -> list[float]:
        """Normalised Gaussian weight of each epoch 1..epochs."""
        mean = self.gpa_mean if self.gpa_mean is not None else 0.75 * epochs
        raw = [math.exp(-((e - mean) ** 2) / (2 * self.gpa_std ** 2)) for e in range(1, epochs + 1)]
        return [w / sum(raw) for w in raw]

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        weight = self.gpa_weights(epochs)[epoch - 1]
        self.gpa_weight += weight
        for name, p in self._prompts():
            getattr(self, f"gpa_{name}").add_(weight * p)
        if epoch == epochs:  # training ends with the aggregated prompts
            for name, p in self._prompts():
                p.copy_(getattr(self, f"gpa_{name}") / self.gpa_weight)

"""KgCoOp: knowledge-guided context optimisation (Yao et al., CVPR 2023)."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F

from ..registry import register_method
from ..templates import dataset_template
from .base import LossOutput
from .coop import CoOp


@register_method("kgcoop")
class KgCoOp(CoOp):
    """CoOp + `weight` x (1 - mean cosine(learned class text features, hand-crafted ones)): the learned
    prompts stay close to CLIP's general knowledge. Hand-crafted features are encoded once.

    Defaults are the official code's: weight 8.0, 4 context tokens from "a photo of a", KgCoOp's hand-crafted
    template for `dataset` (its own per-dataset table; None: "a photo of a {}.") unless `templates` is given.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = 4, ctx_init: str | None = "a photo of a",
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 weight: float = 8.0, dataset: str | None = None, templates: Sequence[str] | None = None):
        super().__init__(clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std)
        self.weight = weight
        templates = templates or [dataset_template(dataset, "kgcoop")]
        self.register_buffer("handcrafted", clip.zero_shot_text_features(self.classnames, list(templates)),
                             persistent=False)

    def training_loss(self, labels, images=None, *, image_features=None) -> LossOutput:
        text = self.text_features()
        logits = self(images, image_features=image_features, text_features=text)
        ce = F.cross_entropy(logits.float(), labels)
        kg = 1 - F.cosine_similarity(text.float(), self.handcrafted.float(), dim=-1, eps=1e-7).mean()
        return LossOutput(ce + self.weight * kg, logits, {"ce": ce.detach(), "kg": kg.detach()})

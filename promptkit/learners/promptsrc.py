"""PromptSRC: self-regulating prompts (Khattak et al., ICCV 2023)."""
from __future__ import annotations

from typing import Sequence

from ..registry import register_method
from ..templates import PROMPTSRC_TEMPLATES
from .ivlp import IVLP


@register_method("promptsrc")
class PromptSRC(IVLP):
    """IVLP prompts trained with CE + the `promptsrc` objective (L1 of the learned text and image features to
    frozen CLIP's, weighted by `text_weight` and `image_weight`, + KL to the frozen zero-shot logits; the frozen
    text target is the mean of the raw features over PromptSRC's 60 `templates`, normalised once) + `gpa`
    (the prompts end as their Gaussian-weighted average over epochs: N(e; `gpa_mean`, `gpa_std`); `gpa_mean`
    None uses 0.75 x epochs). See `promptkit.objectives`.

    Defaults are the paper's (base-to-novel, ViT-B/16): 4 text + 4 vision tokens, depth 9, weights 25 and 10,
    GPA mean 15 and std 1 for 20 epochs; SGD lr 0.0025, batch 4.
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
        self.set_objectives(["ce", ("promptsrc", dict(text_weight=text_weight, image_weight=image_weight,
                                                      templates=list(templates))),
                             ("gpa", dict(mean=gpa_mean, std=gpa_std))])

"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022), on CLIP's vision transformer."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import _compat
from .._keywords import renamed
from ..registry import register_method
from .deep import check_depth, visual_prompt_hooks, vpt_init
from .zeroshot import ZeroShotCLIP


@register_method("vpt")
class VPT(ZeroShotCLIP):
    """Learnable tokens after CLS in the vision transformer; the text side is CLIP's fixed
    hand-crafted prompts (template ensemble supported, encoded once).

    Args:
        clip: the frozen model.
        classnames: class names in label order.
        n_vision: prompt tokens per layer (MaPLe's deep-VPT baseline: 8; was `n_tokens`).
        vision_depth: 1 = shallow (tokens at the input only); L = deep (fresh tokens at each of the first L
            layers, replacing the previous layer's prompt outputs). None: every layer. (Was `depth`.)
        templates: hand-crafted templates for the class text features.
        init: "normal" (N(0, init_std^2), as MaPLe's deep-VPT baseline, whose numbers the README quotes) or
            "uniform" (the VPT paper's U(-v, v), v = sqrt(6 / (3 * patch^2 + width))).
        init_std: std of the "normal" init.
    """

    image_prompted = True

    @renamed(n_tokens="n_vision", depth="vision_depth")
    def __init__(self, clip, classnames: Sequence[str], n_vision: int = 8, vision_depth: int | None = None,
                 templates: Sequence[str] = ("a photo of a {}.",), init: str = "normal", init_std: float = 0.02):
        clip.require_vit("VPT")
        super().__init__(clip, classnames, templates)
        layers = len(clip.vision_blocks)
        depth = layers if vision_depth is None else vision_depth
        check_depth(depth, layers, "VPT")
        if init not in ("normal", "uniform"):
            raise ValueError(f"init must be 'normal' or 'uniform', got {init!r}")
        shape = (depth if n_vision else 0, n_vision, clip.vision_width)
        if init == "normal":
            tokens = torch.randn(shape) * init_std
        else:
            tokens = vpt_init(*shape[1:], _compat.patch_size(clip.model), shape[0])
        self.prompt_tokens = nn.Parameter(tokens.to(clip.device))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, hooks=visual_prompt_hooks(self.clip, list(self.prompt_tokens)))

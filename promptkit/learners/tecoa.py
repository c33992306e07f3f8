"""TeCoA: text-guided contrastive adversarial training of visual prompts (Mao et al., ICLR 2023)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..registry import register_method
from .deep import visual_prompt_hooks
from .zeroshot import ZeroShotCLIP


@register_method("tecoa")
class TeCoA(ZeroShotCLIP):
    """The visual prompts of TeCoA's prompt-tuning variant, trained with the `tecoa` objective (cross-entropy
    of the image-to-class-text logits of PGD-attacked images; PGD eps 1/255, 2 steps of 1/255 at training).

    As the official code (cvlab-columbia/ZSRobust4FoundationModel, models/prompters.py, visual_prompt.py):
      * a padding prompt: a learned frame `pad_size` pixels wide added to the normalised image (`PadPrompter`,
        30 pixels at 224, so `round(30 x image_size / 224)` by default), drawn from N(0, 1);
      * `n_tokens` learned tokens appended to the vision transformer's input sequence before `ln_pre`, with a
        zero position embedding (`TokenPrompter`, their modified CLIP), drawn from N(0, 1). Here they sit after
        CLS instead of after the patches, which computes the same: without a position embedding, attention does
        not see the order of the tokens;
      * the text side fixed: "This is a photo of a {}" per class.
    The README's prompting run (`--add_prompt_size 100`) uses 100 tokens: the default. The authors also clamp
    CLIP's logit scale at 100 after each step; CLIP's is 100 already and stays frozen here.

    Args:
        clip: the frozen model (a ViT for the tokens; `n_tokens=0` for a padding-only prompt on any model).
        classnames: class names in label order.
        n_tokens: tokens appended to the image sequence.
        pad_size: width of the padding prompt in pixels (0: none); None: 30/224 of the image side.
        templates: the class text (fixed).
        init_std: std of the N(0, std^2) initialisation of both prompts.
    """

    image_prompted = True

    def __init__(self, clip, classnames: Sequence[str], n_tokens: int = 100, pad_size: int | None = None,
                 templates: Sequence[str] = ("This is a photo of a {}",), init_std: float = 1.0):
        super().__init__(clip, classnames, templates)
        size = clip.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        pad = round(30 * size / 224) if pad_size is None else pad_size
        if not 0 <= 2 * pad < size:
            raise ValueError(f"pad_size must be in [0, {(size - 1) // 2}] for {size}-pixel images, got {pad}")
        if n_tokens < 0 or (n_tokens == 0 and pad == 0):
            raise ValueError(f"tecoa needs a prompt: n_tokens >= 1 and/or pad_size >= 1, got {n_tokens} and {pad}")
        if n_tokens:
            clip.require_vit("TeCoA's token prompts")
        device, inner = clip.device, size - 2 * pad
        self.pad_size, self.image_size = pad, size
        self.pad_up = nn.Parameter(torch.randn(3, pad, size).mul(init_std).to(device))
        self.pad_down = nn.Parameter(torch.randn(3, pad, size).mul(init_std).to(device))
        self.pad_left = nn.Parameter(torch.randn(3, inner, pad).mul(init_std).to(device))
        self.pad_right = nn.Parameter(torch.randn(3, inner, pad).mul(init_std).to(device))
        self.prompt_tokens = nn.Parameter(torch.randn(n_tokens, clip.vision_width).mul(init_std).to(device))
        self.set_objectives(["tecoa"])

    def padding(self) -> torch.Tensor:
        """The padding prompt [3, S, S]: the learned frame, zeros inside."""
        inner = self.pad_left.new_zeros(3, self.image_size - 2 * self.pad_size, self.image_size - 2 * self.pad_size)
        middle = torch.cat([self.pad_left, inner, self.pad_right], dim=2)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"tecoa's padding prompt is {self.image_size} x {self.image_size} pixels; got images of "
                             f"{tuple(images.shape[-2:])}: resize them to the model's input size")
        prompted = images + self.padding().to(images.dtype) if self.pad_size else images
        hooks = visual_prompt_hooks(self.clip, [self.prompt_tokens]) if len(self.prompt_tokens) else []
        return self.clip.encode_image(prompted, hooks=hooks)

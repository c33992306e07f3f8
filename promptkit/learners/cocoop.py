"""CoCoOp: Conditional Prompt Learning (Zhou et al., CVPR 2022)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..objectives import TrainOutputs
from ..registry import register_method
from .coop import CoOp


@register_method("cocoop")
class CoCoOp(CoOp):
    """CoOp context shifted per image by a Meta-Net (Linear d -> d/16, ReLU, Linear -> width) of the
    image feature: one prompt set per image, so the text encoder runs over B x C prompts per batch.

    Memory: the reference implementation runs all B x C prompts at 77 tokens at once (about 64x
    CoOp's memory at batch 1 on ImageNet). Here the text pass is truncated to the longest prompt and
    run `text_batch` images at a time: activation memory is that of `text_batch` x C prompts, so
    lower it if memory is short (results do not change).

    `text_features()` are the prompts with the Meta-Net applied to a zero image feature (its bias
    only): a class-level summary; predictions always use the per-image prompts.

    Defaults are the paper's: 4 context tokens from "a photo of a"; trained with SGD lr 0.002, batch 1, 10 epochs.

    Args:
        n_ctx, ctx_init, init_std: as CoOp.
        text_batch: images whose B x C prompts are encoded together.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = None,
                 ctx_init: str | None = "a photo of a",
                 init_std: float = 0.02, text_batch: int = 8):
        super().__init__(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        hidden = clip.embed_dim // 16
        self.meta_net = nn.Sequential(nn.Linear(clip.embed_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, clip.text_width)).to(self.ctx.device)
        self.text_batch = text_batch

    @property
    def batched_tuning(self) -> bool:
        # The Meta-Net conditions the context, not the image path: batched whenever images are unprompted.
        return not self.image_prompted

    def tunable_context(self, image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        """As TPT on CoCoOp: the image-conditioned context, context + Meta-Net(image feature) [B, n_ctx, W]."""
        if image_features is None:
            return None
        return self.ctx + self.meta_net(image_features.to(self.ctx.dtype)).unsqueeze(1)

    def text_features(self) -> torch.Tensor:
        return self.context_text_features(self.tunable_context(torch.zeros(1, self.clip.embed_dim,
                                                                           device=self.ctx.device)))[0]

    def training_outputs(self, images=None, *, image_features=None) -> TrainOutputs:
        if image_features is None:
            image_features = self.encode_image(images)
        return TrainOutputs(self, self(image_features=image_features), image_features, None, images)

    def forward(self, images=None, *, image_features=None, text_features=None) -> torch.Tensor:
        """Logits [B, C] against each image's own prompts (`text_features` is not used), or the linear `head`'s."""
        if image_features is None:
            image_features = self.encode_image(images)
        if self.head is not None:
            return self.logits(image_features, None)
        logits = []
        for chunk in image_features.split(self.text_batch):
            text = self.context_text_features(self.tunable_context(chunk))
            with torch.autocast(chunk.device.type, enabled=False):  # fp32 logits, as `PromptLearner.logits`
                logits.append(self.clip.logit_scale.float() * torch.einsum("bd,bcd->bc", chunk.float(), text.float()))
        return torch.cat(logits)

"""CoCoOp: Conditional Prompt Learning (Zhou et al., CVPR 2022)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..objectives import TrainOutputs
from ..registry import register_method
from .coop import CoOp


@register_method("cocoop")
class CoCoOp(CoOp):
    """CoOp context shifted per image by a Meta-Net (Linear d -> d/16, ReLU, Linear -> width) of the
    image feature: one prompt set per image, so the text encoder runs over B x C prompts per batch.

    Memory: the reference implementation runs all B x C prompts at 77 tokens at once (about 64x
    CoOp's memory at batch 1 on ImageNet). Here the text pass is truncated to the longest prompt and
    run `text_batch` images at a time (`prompt_set_features`, which Bayesian prompt learning and CPL share),
    and when gradients are needed each chunk is checkpointed (`checkpoint_text`): only one chunk's text-tower
    activations are alive at a time, so activation memory is that of `text_batch` x C prompts whatever the
    batch; lower `text_batch` if memory is short (results do not change).

    `text_features()` are the prompts with the Meta-Net applied to a zero image feature (its bias
    only): a class-level summary; predictions always use the per-image prompts.

    Defaults are the paper's: 4 context tokens from "a photo of a"; trained with SGD lr 0.002, batch 1, 10 epochs.

    Args:
        n_ctx, ctx_init, init_std: as CoOp.
        text_batch: prompt sets (C prompts each, one per image) encoded together.
        checkpoint_text: activation checkpointing of each chunk of `text_batch` prompt sets when gradients are
            needed (`torch.utils.checkpoint`): the chunk's text-tower activations are freed after its forward and
            recomputed during backward, so memory no longer grows with the number of prompt sets per step. The
            cost is one more text forward per chunk in backward (about a third more time per step). "auto": when
            the prompt sets of a step take more than one chunk (with one chunk its graph is all that is alive
            anyway, and recomputing it would save nothing); True: always; False: never (every chunk's graph
            is kept until backward). On CPU, glibc's malloc can keep the freed activations of chunk after chunk
            resident; MALLOC_MMAP_THRESHOLD_=131072 in the environment hands them back (see the README).
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = None,
                 ctx_init: str | None = "a photo of a",
                 init_std: float = 0.02, text_batch: int = 8, checkpoint_text: bool | str = "auto"):
        if isinstance(text_batch, bool) or not isinstance(text_batch, int) or text_batch < 1:
            raise ValueError(f"text_batch (prompt sets encoded together) must be an integer >= 1, got {text_batch!r}")
        if not (isinstance(checkpoint_text, bool) or checkpoint_text == "auto"):
            raise ValueError(f"checkpoint_text must be True, False or 'auto', got {checkpoint_text!r}")
        super().__init__(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std)
        hidden = clip.embed_dim // 16
        self.meta_net = nn.Sequential(nn.Linear(clip.embed_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, clip.text_width)).to(self.ctx.device)
        self.text_batch, self.checkpoint_text = text_batch, checkpoint_text

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
        text = self.image_text_features(image_features)
        with torch.autocast(image_features.device.type, enabled=False):  # fp32 logits, as `PromptLearner.logits`
            return self.clip.logit_scale.float() * torch.einsum("bd,bcd->bc", image_features.float(), text.float())

    def image_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Each image's class text features [B, C, D] (its own prompts)."""
        return self.prompt_set_features(self.tunable_context(image_features))

    def prompt_set_features(self, contexts: torch.Tensor) -> torch.Tensor:
        """Class text features [K, C, D] of K contexts [K, n_ctx, W] (one per image; per image and Monte Carlo
        sample in Bayesian prompt learning), encoded `text_batch` contexts at a time, each chunk checkpointed
        as `checkpoint_text` says.

        The recomputation in backward calls `context_text_features` again on the chunk's saved contexts: it
        builds the context hook afresh and `FrozenCLIP.encode_text` installs it for that pass only, so the
        recomputed forward is the original one (same hooks, same text path, shared prefix included) and no
        hook outlives it. Nothing in the text pass draws random numbers (callers draw their noise before).
        """
        chunks = contexts.split(self.text_batch)
        wanted = self.checkpoint_text is True or (self.checkpoint_text == "auto" and len(chunks) > 1)
        if not (wanted and torch.is_grad_enabled() and contexts.requires_grad):
            return torch.cat([self.context_text_features(chunk) for chunk in chunks])
        return torch.cat([checkpoint(self.context_text_features, chunk, use_reentrant=False) for chunk in chunks])

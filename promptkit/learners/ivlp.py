"""IVLP (independent vision-language prompting, as defined in MaPLe) and MaPLe (Khattak et al., CVPR 2023)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .._keywords import renamed
from ..registry import register_method
from .base import PromptLearner
from .coop import build_prompts, context_hook
from .deep import check_depth, deep_text_hooks, visual_prompt_hooks
from .tuning import PromptTuning


class DeepPrompts(PromptLearner, PromptTuning):
    """Text context at layer 0 plus deep text prompts at layers 1 .. text_depth-1, and vision prompt
    tokens at layers 0 .. vision_depth-1. The subclasses decide where the vision prompts come from.
    Test-time prompt tuning tunes the layer-0 context in place (the image features may depend on it)."""

    image_prompted = True

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int, ctx_init: str | None, text_depth: int,
                 vision_depth: int):
        clip.require_vit(type(self).__name__)
        super().__init__(clip, classnames)
        self.text_depth, self.vision_depth = text_depth, vision_depth
        check_depth(text_depth, len(clip.text_blocks), "text prompt")
        check_depth(vision_depth, len(clip.vision_blocks), "vision prompt")
        embedding = clip.token_embedding.weight
        if ctx_init:
            # As MaPLe: the prompt reads "<ctx_init> <class>." and its first n_ctx tokens are learned.
            init_ids = clip.word_ids(ctx_init)
            if n_ctx > len(init_ids):
                raise ValueError(f"n_ctx={n_ctx} is longer than ctx_init {ctx_init!r} ({len(init_ids)} tokens)")
            ctx = embedding[init_ids[:n_ctx]].detach().clone().float()
            tokens, ctx_pos = build_prompts(clip, self.classnames, len(init_ids), "end", init_ids)
            ctx_pos = ctx_pos[:, :n_ctx]
        else:
            ctx = torch.randn(n_ctx, clip.text_width) * 0.02
            tokens, ctx_pos = build_prompts(clip, self.classnames, n_ctx, "end")
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx.to(embedding.device))
        self.deep_text = nn.Parameter(torch.randn(max(text_depth - 1, 0), n_ctx, clip.text_width,
                                                  device=embedding.device) * 0.02)
        self.register_buffer("tokens", tokens.to(embedding.device), persistent=False)
        self.register_buffer("ctx_pos", ctx_pos.to(embedding.device), persistent=False)

    def vision_prompts(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def tuning_parameter(self) -> nn.Parameter:
        return self.ctx

    def text_hooks(self):
        return [context_hook(self.clip, self.ctx, self.ctx_pos)] + deep_text_hooks(self.clip, list(self.deep_text))

    def text_features(self) -> torch.Tensor:
        return self.clip.encode_text(self.tokens, hooks=self.text_hooks())

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, hooks=visual_prompt_hooks(self.clip, self.vision_prompts()))


@register_method("ivlp")
class IVLP(DeepPrompts):
    """Independent deep vision and language prompts, no coupling.

    Defaults are MaPLe's IVLP baseline (configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml, the
    numbers the README quotes): context from "a photo of a", 2 text and 2 vision tokens, prompts in every
    layer of both towers (12/12 on ViT-B). PromptSRC's IVLP uses 4+4 tokens at depth 9 (`PromptSRC`).

    Args:
        n_ctx: learned text tokens; n_vision: vision tokens per layer.
        ctx_init: words the text prompt starts from (its first n_ctx tokens are learned).
        text_depth, vision_depth: layers with prompts (0: none; text depth 0 keeps only the layer-0 context;
            None: every layer).
        init_std: std of the vision prompts' Gaussian init (was `vision_init_std`).
    """

    @renamed(vision_init_std="init_std")
    def __init__(self, clip, classnames: Sequence[str], n_ctx: int = 2, n_vision: int = 2,
                 ctx_init: str | None = "a photo of a", text_depth: int | None = None,
                 vision_depth: int | None = None, init_std: float = 0.02):
        clip.require_vit(type(self).__name__)
        text_depth = len(clip.text_blocks) if text_depth is None else text_depth
        vision_depth = len(clip.vision_blocks) if vision_depth is None else vision_depth
        super().__init__(clip, classnames, n_ctx, ctx_init, text_depth, vision_depth)
        self.vision = nn.Parameter(torch.randn(self.vision_depth, n_vision, clip.vision_width,
                                               device=self.ctx.device) * init_std)

    def vision_prompts(self) -> list[torch.Tensor]:
        return list(self.vision) if self.vision.shape[1] else []


@register_method("maple")
class MaPLe(DeepPrompts):
    """Multi-modal prompt learning: vision prompts are linear functions of the text prompts of the
    same layer (the coupling function), so both towers are prompted by one set of parameters.

    Defaults are the paper's (base-to-novel, ViT-B/16): 2 context tokens from "a photo of a", prompts
    in the first 9 layers, coupling Linear(text_width -> vision_width) per layer; trained with SGD
    lr 0.0035, batch 4, 5 epochs, 16 shots.

    Args:
        n_ctx: prompt tokens (text and vision).
        ctx_init: words the text prompt starts from (its first n_ctx tokens are learned).
        depth: layers with prompts (1: layer-0 prompts only; 0: no vision prompts, text context only;
            None: 9, or all layers of a shallower model).
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int = 2, ctx_init: str | None = "a photo of a",
                 depth: int | None = None):
        clip.require_vit("MaPLe")
        if depth is None:
            depth = min(9, len(clip.text_blocks), len(clip.vision_blocks))
        super().__init__(clip, classnames, n_ctx, ctx_init, depth, depth)
        # As the official code: layer 0 has its own Linear; the deeper ones start as copies of one Linear.
        deep = nn.Linear(clip.text_width, clip.vision_width)
        first = [nn.Linear(clip.text_width, clip.vision_width)] if depth else []
        self.coupling = nn.ModuleList(first + [copy.deepcopy(deep) for _ in range(depth - 1)])
        self.coupling.to(self.ctx.device)

    def vision_prompts(self) -> list[torch.Tensor]:
        text = [self.ctx] + list(self.deep_text)
        return [f(t) for f, t in zip(self.coupling, text)]

"""Shared plumbing of visual and deep prompts: where tokens go in, one place for all methods."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..hooks import Hook, deep_prompt_hooks, insert_tokens


def visual_prompt_hooks(clip, prompts: Sequence[torch.Tensor | Callable[[], torch.Tensor]]) -> list[Hook]:
    """Hooks that put `prompts[0]` ([n, vision_width]) after CLS at the input of the vision transformer
    (before `ln_pre`, after patch and position embedding: prompts carry no position) and replace those
    tokens with `prompts[i]` at the input of vision block i (deep prompting)."""
    clip.require_vit("visual prompts")
    if not prompts:
        return []
    first = prompts[0]

    def insert(module, args, kwargs):
        value = first() if callable(first) else first
        return (insert_tokens(args[0], 1, value),) + tuple(args[1:]), kwargs

    return [Hook(clip.model.visual.ln_pre, insert, pre=True)] + deep_prompt_hooks(
        clip.vision_blocks, prompts[1:], start=1, batch_first=clip.vision_batch_first)


def deep_text_hooks(clip, prompts: Sequence[torch.Tensor | Callable[[], torch.Tensor]]) -> list[Hook]:
    """Pre-hooks replacing the context tokens (positions 1 : 1 + n) at text blocks 1, 2, ... with `prompts`."""
    return deep_prompt_hooks(clip.text_blocks, prompts, start=1, batch_first=clip.text_batch_first)


def vpt_init(n_tokens: int, width: int, patch_size: int, depth: int) -> torch.Tensor:
    """VPT's uniform init (Jia et al.): U(-v, v), v = sqrt(6 / (3 * patch^2 + width)). [depth, n, width]"""
    bound = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
    return torch.empty(depth, n_tokens, width).uniform_(-bound, bound)


def check_depth(depth: int, layers: int, what: str) -> None:
    if not 0 <= depth <= layers:
        raise ValueError(f"{what} depth must be in [0, {layers}] for this model, got {depth}")

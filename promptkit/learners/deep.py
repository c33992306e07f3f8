"""Shared plumbing of visual and deep prompts: where tokens go in, one place for all methods."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..hooks import Hook, deep_prompt_hooks, insert_tokens


def visual_prompt_hooks(clip, prompts: Sequence[torch.Tensor | Callable[[], torch.Tensor]]) -> list[Hook]:
    """Hooks that put `prompts[0]` ([n, vision_width]) after the class (and register) tokens at the input of
    the vision transformer (after patch and position embedding: prompts carry no position; before open_clip's
    `ln_pre` / timm's `norm_pre`) and replace those tokens with `prompts[i]` at the input of vision block i
    (deep prompting). Where the tower pools over tokens (timm 'avg', 'map'), they are removed after the last
    block (`prompt_removal_hook`)."""
    site = clip.vision_site
    if not prompts:
        return []
    first, start = prompts[0], site.prefix_tokens
    inserted = []  # prompt count of this forward, read by the removal hook

    def insert(module, args, kwargs):
        value = first() if callable(first) else first
        inserted[:] = [value.shape[-2]]
        return (insert_tokens(args[0], start, value),) + tuple(args[1:]), kwargs

    hooks = [Hook(site.embedded, insert, pre=True)] + deep_prompt_hooks(
        site.blocks, prompts[1:], start=start, batch_first=site.batch_first)
    return hooks + prompt_removal_hook(clip, lambda: inserted[0])


def prompt_removal_hook(clip, n: Callable[[], int]) -> list[Hook]:
    """A pre-hook removing the `n()` prompt tokens after the prefix tokens from the sequence the tower pools, so
    that pooling over tokens sees the image's own tokens only; none where the tower pools its class token."""
    site = clip.vision_site
    if site.pooled is None:
        return []
    start = site.prefix_tokens

    def remove(module, args, kwargs):
        x, count = args[0], n()
        return (torch.cat([x[:, :start], x[:, start + count:]], dim=1),) + tuple(args[1:]), kwargs

    return [Hook(site.pooled, remove, pre=True)]


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

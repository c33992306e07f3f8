"""Scoped hook injection: the only way prompts enter a frozen open_clip model.

A learner describes its prompts as a list of `Hook`s; `inject(hooks)` registers them
for the duration of a `with` block and always removes them, also on exceptions.
Outside the block the wrapped model computes exactly what it computed before, so one
frozen model serves any number of learners and the plain zero-shot model at once.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Hook:
    """A forward hook (`fn(module, args, output) -> output`) or, with `pre=True`,
    a forward pre-hook (`fn(module, args, kwargs) -> (args, kwargs)`) on `module`.

    A hook that replaces token positions may say which, so the text encoder can encode a prompt prefix shared
    by many rows once (`FrozenCLIP.encode_text`): `positions` = (start, end), the only positions it changes
    (None: unknown, which keeps the full path); `row_groups` [N]: rows with the same id get the same values
    there (None: all rows do).
    """

    module: nn.Module
    fn: Callable
    pre: bool = False
    positions: tuple[int, int] | None = None
    row_groups: torch.Tensor | None = field(default=None, compare=False)


@contextmanager
def inject(hooks: Iterable[Hook]) -> Iterator[None]:
    """Registers `hooks` for the body of the `with` block only."""
    handles = []
    try:
        for hook in hooks:
            if hook.pre:
                handles.append(hook.module.register_forward_pre_hook(hook.fn, with_kwargs=True))
            else:
                handles.append(hook.module.register_forward_hook(hook.fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(module: nn.Module) -> int:
    """Number of forward hooks and pre-hooks on `module` and all its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def replace_tokens(x: torch.Tensor, start: int, prompts: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """Returns `x` with tokens `start : start + n` replaced by `prompts` ([n, D] shared or [N, n, D])."""
    if not batch_first:
        x = x.transpose(0, 1)
    n = prompts.shape[-2]
    prompts = prompts.to(x.dtype).expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :start], prompts, x[:, start + n:]], dim=1)
    return x if batch_first else x.transpose(0, 1)


def insert_tokens(x: torch.Tensor, start: int, prompts: torch.Tensor) -> torch.Tensor:
    """Returns batch-first `x` with `prompts` ([n, D] or [N, n, D]) inserted before token `start`."""
    prompts = prompts.to(x.dtype).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], prompts, x[:, start:]], dim=1)


def deep_prompt_hooks(blocks: Sequence[nn.Module], prompts: Sequence[torch.Tensor | Callable[[], torch.Tensor]],
                      start: int, batch_first: bool, first_layer: int = 1) -> list[Hook]:
    """Pre-hooks that replace tokens `start : start + n` at the input of `blocks[first_layer + i]`
    with `prompts[i]` (deep prompting: fresh tokens per layer, the previous layer's prompt
    outputs are discarded). A prompt may be a callable, evaluated when its block runs."""

    def make(prompt):
        def hook(module, args, kwargs):
            value = prompt() if callable(prompt) else prompt
            if args:
                return (replace_tokens(args[0], start, value, batch_first),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            key = "q_x" if "q_x" in kwargs else "x"
            kwargs[key] = replace_tokens(kwargs[key], start, value, batch_first)
            return args, kwargs
        return hook

    def positions(prompt):
        # Only a tensor shared by all rows is known ahead of the pass to be common to every row.
        return (start, start + prompt.shape[-2]) if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 else None

    return [Hook(blocks[first_layer + i], make(p), pre=True, positions=positions(p)) for i, p in enumerate(prompts)]

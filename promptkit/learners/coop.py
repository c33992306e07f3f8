"""CoOp: Learning to Prompt for Vision-Language Models (Zhou et al., IJCV 2022)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..hooks import Hook
from ..registry import register_method
from .base import PromptLearner
from .tuning import PromptTuning

POSITIONS = ("end", "middle", "front")


def build_prompts(clip, classnames: Sequence[str], n_ctx: int, position: str = "end",
                  placeholder: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of "[SOS] [ctx]*n_ctx [CLASS]. [EOS]" per class (context tokens at the front of the
    class name for `position="front"`, split around it for `"middle"`), and the positions of the
    context tokens [C, n_ctx]. `placeholder` ids fill the context slots (default "X")."""
    if position not in POSITIONS:
        raise ValueError(f"class_token_position must be one of {POSITIONS}, got {position!r}")
    ctx_ids = list(placeholder) if placeholder is not None else clip.word_ids("X") * n_ctx
    period = clip.word_ids(".")
    rows, positions = [], []
    for name in classnames:
        name_ids = clip.word_ids(name)
        if position == "end":
            body, start = ctx_ids + clip.word_ids(name + "."), [0]
        elif position == "front":
            body, start = name_ids + ctx_ids + period, [len(name_ids)]
        else:
            half = n_ctx // 2
            body = ctx_ids[:half] + name_ids + ctx_ids[half:] + period
            start = [0, half + len(name_ids)]
        ids = [clip.sot_id] + body + [clip.eot_id]
        if len(ids) > clip.context_length:
            raise ValueError(f"prompt for class {name!r} has {len(ids)} tokens, more than the model's "
                             f"context length {clip.context_length}; shorten the class name or use fewer ctx tokens")
        rows.append(ids + [0] * (clip.context_length - len(ids)))
        if position == "middle":
            pos = list(range(1, 1 + half)) + list(range(1 + start[1], 1 + start[1] + n_ctx - half))
        else:
            pos = list(range(1 + start[0], 1 + start[0] + n_ctx))
        positions.append(pos)
    return torch.tensor(rows), torch.tensor(positions)


def context_hook(clip, ctx: torch.Tensor | callable, ctx_pos: torch.Tensor,
                 row_context: torch.Tensor | None = None) -> Hook:
    """Forward hook on the token embedding writing `ctx` into the context slots `ctx_pos` [R, n_ctx].

    `ctx` is [n_ctx, W] (shared by all rows), [K, n_ctx, W] (row r of the prompt table takes
    `ctx[row_context[r]]`, e.g. one context per image over all its classes; without `row_context`, one per
    row, e.g. class-specific), or a callable returning either, evaluated when the text runs.
    """

    def hook(module, args, out):
        value = ctx() if callable(ctx) else ctx
        rows = clip.text_rows
        if rows is None:
            rows = torch.arange(out.shape[0], device=out.device)
        pos = ctx_pos[rows]
        if value.dim() == 2:
            value = value.expand(len(rows), -1, -1)
        else:
            value = value[rows if row_context is None else row_context[rows]]
        return out.index_put((rows.new_tensor(range(len(rows)))[:, None], pos), value.to(out.dtype))

    # Which rows share their context is known only for a tensor (a callable's value is seen when it runs).
    positions = None
    if isinstance(ctx, torch.Tensor) and (ctx.dim() == 2 or row_context is not None):
        positions = (int(ctx_pos.min()), int(ctx_pos.max()) + 1)
    return Hook(clip.token_embedding, hook, positions=positions,
                row_groups=row_context if positions is not None and ctx.dim() == 3 else None)


def init_context(clip, n_ctx: int | None, ctx_init: str | None, init_std: float) -> tuple[torch.Tensor, list | None]:
    """Initial context [n_ctx, W] and the token ids its slots hold in the prompt table (None: placeholders).

    With `ctx_init`, its word embeddings are the last tokens of the context and any further ones are zero
    vectors in front (ProGrad's "X X ... a photo of a"); `n_ctx=None` takes the length of `ctx_init`.
    Without it, `n_ctx` (None: 16) vectors are drawn from N(0, init_std^2).
    """
    if not ctx_init:
        n_ctx = 16 if n_ctx is None else n_ctx
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx} (or give ctx_init)")
        return torch.randn(n_ctx, clip.text_width) * init_std, None
    init_ids = clip.word_ids(ctx_init.replace("_", " "))
    n_ctx = len(init_ids) if n_ctx is None else n_ctx
    if n_ctx < len(init_ids):
        raise ValueError(f"n_ctx={n_ctx} is shorter than ctx_init {ctx_init!r} ({len(init_ids)} tokens); use n_ctx "
                         f">= {len(init_ids)} (extra tokens start as zero vectors in front) or n_ctx=None")
    pad = n_ctx - len(init_ids)
    words = clip.token_embedding.weight[init_ids].detach().float().cpu()
    init = torch.cat([torch.zeros(pad, clip.text_width), words])
    return init, clip.word_ids("X") * pad + init_ids


@register_method("coop")
class CoOp(PromptLearner, PromptTuning):
    """Learnable context vectors in front of (or around) the class name, text side only. Test-time prompt
    tuning (`PromptTuning`) tunes the context, batched.

    Args:
        clip: the frozen model.
        classnames: class names in label order.
        n_ctx: number of context tokens (None: 16, or the length of `ctx_init`).
        ctx_init: words to initialise the context from (e.g. "a photo of a"); with a longer `n_ctx` the
            extra tokens are zero vectors in front of them, as ProGrad initialises its 16 tokens.
        class_specific: one context per class (CSC) instead of one shared context. Unlike CoOp's code,
            which ignores CSC when `ctx_init` is given, each class then starts from `ctx_init`.
        class_token_position: "end", "middle" or "front".
        init_std: std of the random Gaussian init when `ctx_init` is None.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = None, ctx_init: str | None = None,
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02):
        super().__init__(clip, classnames)
        init, init_ids = init_context(clip, n_ctx, ctx_init, init_std)
        self.n_ctx = n_ctx = len(init)
        if class_specific:
            init = init.unsqueeze(0).repeat(self.n_classes, 1, 1)
        device = clip.token_embedding.weight.device
        self.ctx = nn.Parameter(init.to(device))
        tokens, ctx_pos = build_prompts(clip, self.classnames, n_ctx, class_token_position, init_ids)
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("ctx_pos", ctx_pos.to(device), persistent=False)

    def text_hooks(self) -> list[Hook]:
        """Hooks that put this learner's context into the text encoder."""
        return [context_hook(self.clip, self.ctx, self.ctx_pos)]

    def text_features(self) -> torch.Tensor:
        return self.clip.encode_text(self.tokens, hooks=self.text_hooks())

    # -- test-time prompt tuning (`PromptTuning`) ------------------------------------------------
    @property
    def batched_tuning(self) -> bool:
        # Exact while the text side is this context alone and the images are unprompted; a subclass that
        # changes either (CAVPT's image prompts, further text hooks) is tuned in place.
        return (not self.image_prompted and type(self).text_features is CoOp.text_features
                and type(self).text_hooks is CoOp.text_hooks)

    def tuning_parameter(self) -> nn.Parameter:
        return self.ctx

    def tunable_context(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        if image_features is None:
            return self.ctx
        return self.ctx.expand(len(image_features), *self.ctx.shape)

    def context_text_features(self, contexts: torch.Tensor) -> torch.Tensor:
        b, n_classes = len(contexts), self.n_classes
        # One prompt-table row per (context, class): a shared context [n_ctx, W] serves its C rows (which then
        # share their prefix), a class-specific one [C, n_ctx, W] one row each.
        if self.ctx.dim() == 2:
            owner = torch.arange(b, device=contexts.device).repeat_interleave(n_classes)
            hook = context_hook(self.clip, contexts, self.ctx_pos.repeat(b, 1), owner)
        else:
            hook = context_hook(self.clip, contexts.flatten(0, 1), self.ctx_pos.repeat(b, 1))
        return self.clip.encode_text(self.tokens.repeat(b, 1), hooks=[hook]).view(b, n_classes, -1)

"""MVLPT: Multitask Vision-Language Prompt Tuning (Shen et al., WACV 2024)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..hooks import Hook, deep_prompt_hooks, insert_tokens
from ..registry import register_method
from .base import PromptLearner
from .coop import build_prompts, context_hook, init_context
from .deep import vpt_init

PROMPTS = ("text", "visual", "unified")
# (text context, vision tokens) per prompt type: the authors' scripts run MCoOp and MVPT with 16, MUPT with 4 + 4.
DEFAULT_TOKENS = {"text": (16, 0), "visual": (0, 16), "unified": (4, 4)}
VISUAL_TEMPLATE = "a photo of a {}."  # the fixed text of MVPT (the code's prompt prefix "a photo of a ")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class JointProjection(nn.Module):
    """MUPT's shared module between the text context and the vision prompts: both are projected to `dim`
    (a Linear in and out for each side whose width differs), passed through one CLIP residual attention block
    (1 head, MLP 4 x dim with QuickGELU) and projected back.

    As the authors' code (`MultitaskVLPromptLearner.forward_mvlpt_proj`), the tokens reach CLIP's sequence-first
    `Transformer` as a [1, N, dim] tensor, i.e. N sequences of one token: each token attends only to itself, so
    the block acts on every token separately (the paper describes a transformer coupling the two modalities).
    """

    def __init__(self, text_width: int, vision_width: int, dim: int):
        super().__init__()
        self.text_in, self.text_out = self._pair(text_width, dim)
        self.vision_in, self.vision_out = self._pair(vision_width, dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 1)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), QuickGELU(), nn.Linear(4 * dim, dim))

    @staticmethod
    def _pair(width: int, dim: int) -> tuple[nn.Module, nn.Module]:
        if width == dim:
            return nn.Identity(), nn.Identity()
        return nn.Linear(width, dim), nn.Linear(dim, width)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        """The residual attention block on tokens [N, dim], each its own length-1 sequence."""
        x = x.unsqueeze(0)  # [L=1, N, dim]: sequence first, as CLIP's Transformer reads it
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln_2(x))
        return x.squeeze(0)

    def forward(self, ctx: torch.Tensor, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`ctx` [n, text_width], `vision` [depth, m, vision_width]) -> the projected pair, same shapes."""
        tokens = torch.cat([self.text_in(ctx), self.vision_in(vision.flatten(0, 1))]).float()
        tokens = self.block(tokens)
        n = len(ctx)
        return self.text_out(tokens[:n]), self.vision_out(tokens[n:]).view_as(vision)


@register_method("mvlpt")
class MVLPT(PromptLearner):
    """Multitask vision-language prompt tuning: a prompt learned jointly on several source tasks (a
    `MultiTaskDataset`: one shared prompt, each sample scored against its own task's classes; build the learner
    with `tasks=dataset.tasks`), then used to initialise the prompt of a target task (`init_from`).

    Prompt types, as the paper's:
        "text" (MCoOp): CoOp's context, 16 random tokens split around the class name ("middle", the code's
            default), text side only; with one task it is CoOp with these settings.
        "visual" (MVPT): deep VPT, 16 tokens per vision layer (U(-v, v) with VPT's v), after CLS; the text is
            the fixed "a photo of a {}.".
        "unified" (MUPT): 4 text context tokens and 4 vision tokens per layer, both read through one shared
            `JointProjection`, which is learned (and transferred) with them.

    Follows the authors' code (sIncerass/MVLPT, trainers/mvlpt.py): the layer-0 vision tokens are inserted after
    `ln_pre` (VPT here, from MaPLe's baseline, inserts them before it), and deep tokens replace those of the
    previous layer at each later block. The code scores multi-task batches on the CoOp datasets against the
    union of all tasks' classes (its per-task selection, `MULTITASK_LABEL_PERTASK`, is off there and multiplies
    the other tasks' logits by 0 where on, so they still enter the softmax); here a multi-task learner scores each
    sample against its own task's classes only.

    Args:
        clip: the frozen model.
        classnames: class names in label order (of all tasks, for a multi-task source).
        prompt: "text", "visual" or "unified".
        n_ctx: text context tokens ("text", "unified"; None: 16 / 4, or the length of `ctx_init`).
        n_vision: vision tokens per layer ("visual", "unified"; None: 16 / 4).
        ctx_init: words to initialise the text context from (e.g. "a photo of a"; None: N(0, init_std^2)).
        class_token_position: "middle" (the code's default), "end" or "front".
        vision_deep: fresh vision tokens at every layer (the code's default) instead of at the input only.
        project_dim: width of MUPT's joint projection.
        init_std: std of the random text context.
    """

    def __init__(self, clip, classnames: Sequence[str], prompt: str = "text", n_ctx: int | None = None,
                 n_vision: int | None = None, ctx_init: str | None = None, class_token_position: str = "middle",
                 vision_deep: bool = True, project_dim: int = 128, init_std: float = 0.02):
        super().__init__(clip, classnames)
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS} (MCoOp, MVPT, MUPT), got {prompt!r}")
        default_ctx, default_vision = DEFAULT_TOKENS[prompt]
        self.prompt, device = prompt, clip.device
        self.image_prompted = bool(default_vision)
        if default_vision:  # the authors' code draws the vision prompts first
            clip.require_vit(f"MVLPT's {prompt} prompts")
            n_vision = default_vision if n_vision is None else n_vision
            if n_vision < 1:
                raise ValueError(f"n_vision must be >= 1 for {prompt} prompts, got {n_vision}")
            depth = len(clip.vision_blocks) if vision_deep else 1
            patch = clip.model.visual.patch_size
            init = vpt_init(n_vision, clip.vision_width, patch[0] if isinstance(patch, (tuple, list)) else patch, depth)
            self.vision = nn.Parameter(init.to(device))
        if default_ctx:
            if n_ctx is None and not ctx_init:
                n_ctx = default_ctx
            init, init_ids = init_context(clip, n_ctx, ctx_init, init_std)
            self.n_ctx = len(init)
            self.ctx = nn.Parameter(init.to(device))
            tokens, ctx_pos = build_prompts(clip, self.classnames, self.n_ctx, class_token_position, init_ids)
            self.register_buffer("tokens", tokens.to(device), persistent=False)
            self.register_buffer("ctx_pos", ctx_pos.to(device), persistent=False)
        else:
            self.register_buffer("_text_features", clip.zero_shot_text_features(self.classnames, [VISUAL_TEMPLATE]),
                                 persistent=False)
        if prompt == "unified":
            self.projection = JointProjection(clip.text_width, clip.vision_width, project_dim).to(device)

    def prompts(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(text context [n_ctx, text_width], vision tokens [depth, n_vision, vision_width]) as the encoders
        read them: through the joint projection for "unified"; None for a side without prompts."""
        ctx, vision = getattr(self, "ctx", None), getattr(self, "vision", None)
        if self.prompt == "unified":
            return self.projection(ctx, vision)
        return ctx, vision

    def text_features(self) -> torch.Tensor:
        if self.prompt == "visual":
            return self._text_features
        ctx = self.prompts()[0]
        return self.clip.encode_text(self.tokens, hooks=[context_hook(self.clip, ctx, self.ctx_pos)])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.prompt == "text":
            return self.clip.encode_image(images)
        vision = self.prompts()[1]
        first = vision[0]
        # After ln_pre, as the authors' ImageEncoder: the prompts are not layer-normed with the patches.
        insert = Hook(self.clip.model.visual.ln_pre, lambda module, args, out: insert_tokens(out, 1, first))
        deep = deep_prompt_hooks(self.clip.vision_blocks, list(vision[1:]), start=1,
                                 batch_first=self.clip.vision_batch_first)
        return self.clip.encode_image(images, hooks=[insert] + deep)

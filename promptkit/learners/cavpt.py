"""CAVPT: class-aware visual prompt tuning, the visual half of DPT (Xing et al., "Dual Modality Prompt
Tuning for Vision-Language Pre-Trained Model", IEEE TMM 2023)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._keywords import renamed
from ..hooks import Hook
from ..registry import register_method
from ..templates import dataset_template
from ..objectives import TrainOutputs
from .coop import CoOp
from .deep import prompt_removal_hook


class ClassAwarePrompts(nn.Module):
    """One class-aware layer: the top-K classes' text features, mapped to the vision width, attend over
    the layer's image tokens (plus learnable key/value tokens) and become K prompt tokens; a linear
    classifier on them gives the auxiliary class-aware logits."""

    def __init__(self, embed_dim: int, width: int, n_classes: int, n_kv: int, attn_dim: int):
        super().__init__()
        self.text_to_width = nn.Linear(embed_dim, width)
        self.q, self.k = nn.Linear(width, attn_dim, bias=False), nn.Linear(width, attn_dim, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.kv_tokens = nn.Parameter(torch.randn(n_kv, width) * 0.02)
        self.norm_logits, self.norm_out = nn.LayerNorm(width), nn.LayerNorm(width)
        self.classifier = nn.Linear(width, n_classes, bias=False)

    def forward(self, image_tokens: torch.Tensor, class_text: torch.Tensor):
        """image_tokens [B, N, W] (not differentiated, as in the authors' code), class_text [B, K, D]
        -> prompts [B, K, W], logits [B, K, C]."""
        query = self.text_to_width(class_text.to(self.kv_tokens.dtype))
        keys = torch.cat([image_tokens.detach().to(query.dtype), self.kv_tokens.expand(len(query), -1, -1)], dim=1)
        attention = (self.q(query) @ self.k(keys).transpose(1, 2) / self.q.out_features ** 0.5).softmax(-1)
        out = self.v(attention @ keys)
        return self.norm_out(out + query), self.classifier(self.norm_logits(out))


@register_method("cavpt")
class CAVPT(CoOp):
    """CoOp text context + deep VPT tokens in the lower vision layers + class-aware visual prompts in the
    top `class_aware_layers` layers, built from the learned text features of the `top_k` classes that
    frozen zero-shot CLIP ranks highest for the image. Trained with the `dpt` objective (the authors' loss:
    a first stage of `first_stage_epochs` epochs guided by frozen CLIP on both sides, then CE; always +
    `weight` x the class-aware classifiers' CE; see `promptkit.objectives.regularisers.DPTLoss`).

    As the authors' code (fanrena/DPT): the class-aware layers read the *unnormalised* learned text features;
    prompt tokens are added after `ln_pre`, fresh at every layer and dropped after it; keys/values are the
    layer's image tokens (detached) plus 10 learnable tokens; query/key maps to 32 dims. Defaults are their
    script's: 16 context tokens, 10 VPT tokens, class-aware prompts in the last layer only, K = 10,
    auxiliary weight 0.3 (was `aux_weight`), the dataset's CoOp template for the zero-shot ranking (`dataset`).
    `class_text="normalized"` feeds the class-aware layers normalised text features, as promptkit 0.1 did (its
    saves load so).
    """

    image_prompted = True

    @renamed(n_vpt="n_vision", aux_weight="weight")
    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = 16, ctx_init: str | None = None,
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 n_vision: int = 10, class_aware_layers: int = 1, top_k: int = 10, n_kv: int = 10,
                 attn_dim: int = 32, weight: float = 0.3, first_stage_epochs: int = 30,
                 dataset: str | None = None, templates: Sequence[str] | None = None, class_text: str = "raw"):
        clip.require_vit("CAVPT")
        super().__init__(clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std)
        layers = len(clip.vision_blocks)
        if not 0 <= class_aware_layers <= layers:
            raise ValueError(f"class_aware_layers must be in [0, {layers}], got {class_aware_layers}")
        if class_text not in ("raw", "normalized"):
            raise ValueError(f"class_text must be 'raw' (the authors') or 'normalized' (promptkit 0.1), got {class_text!r}")
        self.top_k, self.class_text = min(top_k, self.n_classes), class_text
        device = self.ctx.device
        self.vpt = nn.Parameter(torch.randn(layers - class_aware_layers if n_vision else 0, n_vision,
                                            clip.vision_width, device=device) * 0.02)
        self.class_aware = nn.ModuleList(
            ClassAwarePrompts(clip.embed_dim, clip.vision_width, self.n_classes, n_kv, attn_dim)
            for _ in range(class_aware_layers)).to(device)
        templates = templates or [dataset_template(dataset, "coop")]
        self.register_buffer("zero_shot_text", clip.zero_shot_text_features(self.classnames, list(templates)),
                             persistent=False)
        self._eval_text = None  # (normalised, raw) text features of the last `text_features()` without grad
        self.set_objectives([("dpt", dict(weight=weight, first_stage_epochs=first_stage_epochs))])

    def _raw_text(self) -> torch.Tensor:
        return self.clip.encode_text(self.tokens, normalize=False, hooks=self.text_hooks())

    def text_features(self) -> torch.Tensor:
        raw = self._raw_text()
        text = F.normalize(raw, dim=-1)
        # Evaluation computes text features once and passes them back to `forward`: keep the raw ones the
        # class-aware layers need (only without grad, so no training graph is held).
        self._eval_text = None if torch.is_grad_enabled() else (text, raw)
        return text

    def _encode(self, images: torch.Tensor, raw_text: torch.Tensor):
        """Prompted image features [B, D], per-layer class-aware logits [B, layers, K, C], top-K classes [B, K]
        and frozen image features [B, D]."""
        clip = self.clip
        with torch.no_grad():
            frozen = clip.encode_image(images)
            top = (frozen @ self.zero_shot_text.t()).topk(self.top_k, dim=-1).indices
        text = raw_text if self.class_text == "raw" else F.normalize(raw_text, dim=-1)
        class_text = text[top]                                                  # [B, K, D]
        prompt_counts = [self.vpt.shape[1]] * len(self.vpt) + [self.top_k] * len(self.class_aware)
        layer_logits = []
        site = clip.vision_site
        start = site.prefix_tokens  # after the class token (and timm's register tokens)

        def swap(layer, make):
            def hook(module, args, kwargs):
                x = args[0] if site.batch_first else args[0].transpose(0, 1)
                tokens = torch.cat([x[:, :start], x[:, start + (prompt_counts[layer - 1] if layer else 0):]], dim=1)
                x = torch.cat([tokens[:, :start], make(tokens).to(x.dtype), tokens[:, start:]], dim=1)
                return ((x if site.batch_first else x.transpose(0, 1)),) + tuple(args[1:]), kwargs
            return Hook(site.blocks[layer], hook, pre=True)

        def class_aware(module):
            def make(tokens):
                prompts, logits = module(tokens, class_text)
                layer_logits.append(logits)
                return prompts
            return make

        hooks = [swap(i, lambda tokens, p=p: p.expand(len(tokens), -1, -1)) for i, p in enumerate(self.vpt)]
        hooks += [swap(len(self.vpt) + j, class_aware(m)) for j, m in enumerate(self.class_aware)]
        if prompt_counts:
            hooks += prompt_removal_hook(clip, lambda: prompt_counts[-1])
        features = clip.encode_image(images, hooks=hooks)
        stacked = torch.stack(layer_logits, 1) if layer_logits else None
        return features, stacked, top, frozen

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images, self._raw_text())[0]

    def forward(self, images=None, *, image_features=None, text_features=None) -> torch.Tensor:
        if text_features is None:
            raw = self._raw_text()
            text_features = F.normalize(raw, dim=-1)
        elif self._eval_text is not None and self._eval_text[0] is text_features:
            raw = self._eval_text[1]
        else:
            raw = self._raw_text()
        if image_features is None:
            image_features = self._encode(images, raw)[0]
        return self.logits(image_features, text_features)

    def training_outputs(self, images=None, *, image_features=None) -> TrainOutputs:
        raw = self._raw_text()
        text = F.normalize(raw, dim=-1)
        features, layer_logits, top, frozen = self._encode(images, raw)
        extras = {"class_aware_logits": layer_logits, "top": top, "handcrafted_text": self.zero_shot_text}
        return TrainOutputs(self, self.logits(features, text), features, text, images, extras, frozen)

"""Every difference between open_clip versions and tower types lives here.

promptkit talks to open_clip only through the stable submodules named below
(`token_embedding`, `positional_embedding`, `transformer.resblocks`, `ln_final`,
`text_projection`, `attn_mask`, `visual.ln_pre`, `visual.transformer.resblocks`).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

SUPPORTED = (
    "open_clip `CLIP` models with the built-in text transformer and a VisionTransformer "
    "or ModifiedResNet image tower (e.g. ViT-B-32, ViT-B-16, ViT-L-14, RN50)"
)


def check_supported(model: nn.Module) -> None:
    """Raises a TypeError naming what is supported when `model` is not a plain open_clip CLIP."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "visual")
    missing = [name for name in needed if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"promptkit cannot wrap {type(model).__name__}: it has no {', '.join(missing)} "
            f"(models with a Hugging Face or custom text tower are not supported). "
            f"Supported: {SUPPORTED}."
        )
    pool = getattr(model, "text_pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise TypeError(f"text_pool_type={pool!r} is not supported (need 'argmax' or 'eos'). Supported: {SUPPORTED}.")
    if vision_kind(model) == "other":
        raise TypeError(f"image tower {type(model.visual).__name__} is not supported. Supported: {SUPPORTED}.")


def vision_kind(model: nn.Module) -> str:
    """'vit', 'modified_resnet' or 'other'."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(model.visual, VisionTransformer):
        return "vit"
    if isinstance(model.visual, ModifiedResNet):
        return "modified_resnet"
    return "other"


_LAYOUT: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


class _Seen(Exception):
    pass


def batch_first(transformer: nn.Module) -> bool:
    """Whether the blocks of an open_clip Transformer see [N, L, D] or [L, N, D].

    Read from what the transformer does, not from an attribute (open_clip 2.x has `batch_first`, its
    development branch dropped it and is always batch-first): a batch-first input of 2 rows x 3 tokens is
    sent in, and the first block's input shape answers. Once per transformer; the forward stops there.
    """
    if transformer not in _LAYOUT:
        block = transformer.resblocks[0]
        width = block.ln_1.normalized_shape[0]
        param = next(block.parameters())
        seen = []

        def stop(module, args, kwargs):
            seen.append((args[0] if args else kwargs.get("q_x", kwargs.get("x"))).shape)
            raise _Seen

        handle = block.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)  # before prompt hooks
        try:
            with torch.no_grad():
                transformer(torch.zeros(2, 3, width, dtype=param.dtype, device=param.device))
        except _Seen:
            pass
        finally:
            handle.remove()
        if not seen or tuple(seen[0][:2]) not in ((2, 3), (3, 2)):
            raise TypeError(f"cannot tell the token layout of {type(transformer).__name__}: its first block saw "
                            f"{seen[0] if seen else 'nothing'} for a [2, 3, {width}] input. Supported: {SUPPORTED}.")
        _LAYOUT[transformer] = tuple(seen[0][:2]) == (2, 3)
    return _LAYOUT[transformer]


def text_blocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.resblocks


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    return model.visual.transformer.resblocks


def vision_width(model: nn.Module) -> int:
    if vision_kind(model) == "vit":
        return model.visual.conv1.out_channels
    return model.visual.attnpool.c_proj.in_features


def embed_dim(model: nn.Module) -> int:
    proj = model.text_projection
    if proj is None:
        return model.token_embedding.embedding_dim
    return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]


def cast_dtype(model: nn.Module) -> torch.dtype:
    return model.transformer.get_cast_dtype()


def eot_index(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Position of the pooled (end-of-text) token of each row, as open_clip pools it."""
    if getattr(model, "text_pool_type", "argmax") == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def project_text(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    proj = model.text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def causal_mask(model: nn.Module, length: int) -> torch.Tensor | None:
    mask = getattr(model, "attn_mask", None)
    return None if mask is None else mask[:length, :length]


def text_tower(model: nn.Module, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """open_clip's text encoder after the token embedding, over the first `x.shape[1]` positions only."""
    length = x.shape[1]
    x = x + model.positional_embedding[:length].to(x.dtype)
    x = model.transformer(x, attn_mask=causal_mask(model, length))
    x = model.ln_final(x)
    return project_text(model, x[torch.arange(x.shape[0], device=x.device), eot])

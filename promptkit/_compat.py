"""Every difference between open_clip versions and tower types lives here.

promptkit talks to open_clip only through the stable submodules named below
(`token_embedding`, `positional_embedding`, `transformer.resblocks`, `ln_final`,
`text_projection`, `attn_mask`, `visual.ln_pre`, `visual.transformer.resblocks`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
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


def causal_mask(model: nn.Module, length: int, start: int = 0) -> torch.Tensor | None:
    """The text tower's attention mask of queries `start .. length-1` over keys `0 .. length-1` (None: no mask)."""
    mask = getattr(model, "attn_mask", None)
    return None if mask is None else mask[start:length, :length]


def text_tower(model: nn.Module, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """open_clip's text encoder after the token embedding, over the first `x.shape[1]` positions only."""
    length = x.shape[1]
    x = x + model.positional_embedding[:length].to(x.dtype)
    x = model.transformer(x, attn_mask=causal_mask(model, length))
    x = model.ln_final(x)
    return project_text(model, x[torch.arange(x.shape[0], device=x.device), eot])


def prefix_cache_supported(model: nn.Module) -> bool:
    """Whether a prompt prefix shared by many rows can be encoded once and its keys and values reused: the text
    tower has a causal mask (without one, earlier positions see later ones) and open_clip's default blocks
    (`ResidualAttentionBlock` with a packed `nn.MultiheadAttention`, whose weights `block_after_prefix` reads)."""
    from open_clip.transformer import ResidualAttentionBlock

    if causal_mask(model, 1) is None:
        return False
    return all(type(block) is ResidualAttentionBlock and isinstance(block.attn, nn.MultiheadAttention)
               and block.attn._qkv_same_embed_dim and block.attn.in_proj_bias is not None
               and not hasattr(block, "ln_1_kv") for block in text_blocks(model))


def text_block_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Runs the text transformer over batch-first `x` [N, L, D] (positions 0 .. L-1, causal mask) and returns
    each block's input [N, L, D] as the block saw it, after any prompt pre-hooks (registered earlier) ran."""
    transformer, first = model.transformer, batch_first(model.transformer)
    inputs, handles = [], []

    def record(module, args, kwargs):
        h = args[0] if args else kwargs.get("q_x", kwargs.get("x"))
        inputs.append(h if first else h.transpose(0, 1))

    try:
        for block in text_blocks(model):
            handles.append(block.register_forward_pre_hook(record, with_kwargs=True))
        transformer(x, attn_mask=causal_mask(model, x.shape[1]))
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # [N, L, D] -> [N, H, L, D/H]


def prefix_keys_values(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [N, H, L, D/H] that `block`'s attention computes from its input `h` [N, L, D]."""
    attn, width = block.attn, h.shape[-1]
    kv = F.linear(block.ln_1(h), attn.in_proj_weight[width:], attn.in_proj_bias[width:])
    k, v = kv.chunk(2, dim=-1)
    return _heads(k, attn.num_heads), _heads(v, attn.num_heads)


def block_after_prefix(block: nn.Module, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                       attn_mask: torch.Tensor, only: torch.Tensor | None = None) -> torch.Tensor:
    """`block` over the positions P .. P+S-1 of each row, `x` [N, S, D] (batch-first), whose attention also
    sees the positions 0 .. P-1 through their keys and values `past_k`, `past_v` [N, H, P, D/H];
    `attn_mask` [S, P+S] is the model's causal mask for those rows. The same computation as the block's
    own forward over all P+S positions, restricted to the last S outputs [N, S, D], or with `only` [N]
    (suffix index per row) to one output per row [N, 1, D] (the last block: only the pooled one is read)."""
    attn, heads = block.attn, block.attn.num_heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if only is not None:
        rows = torch.arange(len(x), device=x.device)
        x, q = x[rows, only].unsqueeze(1), q[rows, only].unsqueeze(1)
        attn_mask = attn_mask[only].view(len(x), 1, 1, -1)  # each row's query position over all keys
    k = torch.cat([past_k, _heads(k, heads)], dim=2)
    v = torch.cat([past_v, _heads(v, heads)], dim=2)
    out = F.scaled_dot_product_attention(_heads(q, heads), k, v, attn_mask=attn_mask.to(q.dtype))
    out = F.linear(out.transpose(1, 2).flatten(2), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))

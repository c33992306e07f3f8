"""Every difference between open_clip versions and tower types lives here.

promptkit talks to open_clip only through the stable submodules named below
(`token_embedding`, `positional_embedding`, `transformer.resblocks`, `ln_final`,
`text_projection`, `attn_mask` of the text tower, found by `text_module`; `visual.ln_pre`,
`visual.transformer.resblocks`), the text blocks' parts that the shared-prefix pass runs itself
(`prefix_block_problem`) and, for timm image towers, timm VisionTransformer's
`norm_pre`, `blocks`, `num_prefix_tokens` and `norm` (`vision_site`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (
    "open_clip `CLIP` and `CustomTextCLIP` models whose text tower is open_clip's own `TextTransformer` (pooled at "
    "the end-of-text token, 'argmax' or 'eos', or at the 'last' or 'first' position; causal mask or not, as "
    "SigLIP's) with CLIP's BPE tokenizer, and any image tower. Text-side methods (zeroshot, the CoOp family, TPT, "
    "Zero, TDA, the feature-level heads) work on every image tower (ViT, ModifiedResNet, timm towers such as "
    "ConvNeXt); visual and multimodal prompts (vpt, ivlp, maple, promptsrc, cavpt) on open_clip's class-token-pooled "
    "VisionTransformer and on timm VisionTransformer towers (`TimmModel`, as in the SigLIP configs)"
)
TEXT_POOLS = ("argmax", "eos", "last", "first")


def text_module(model: nn.Module) -> nn.Module:
    """The module holding the text tower's `token_embedding`, `positional_embedding`, `transformer`, `ln_final`,
    `text_projection` and `attn_mask`: the model itself for `CLIP` (which copies them out of its
    `TextTransformer`), `model.text` for `CustomTextCLIP`."""
    text = getattr(model, "text", None)
    return model if text is None else text


def text_pool(model: nn.Module) -> str:
    text = getattr(model, "text", None)
    return text.pool_type if text is not None else getattr(model, "text_pool_type", "argmax")


def text_is_causal(model: nn.Module) -> bool:
    """Whether the text tower masks attention causally. Only then does a position's hidden state not depend
    on later positions, so that encoding a prompt up to its pooled token (truncation) or a shared prefix once
    (prefix caching) gives the same numbers as the full sequence; without it (SigLIP) every prompt is encoded
    over the whole context."""
    return text_module(model).attn_mask is not None


def check_supported(model: nn.Module) -> None:
    """Raises a TypeError naming what is supported when promptkit cannot drive `model`'s text tower.
    Any image tower is accepted here; methods that prompt it check `vision_kind` themselves."""
    from open_clip.transformer import TextTransformer

    name = type(model).__name__
    text = getattr(model, "text", None)
    if text is not None and not isinstance(text, TextTransformer):
        raise TypeError(f"promptkit cannot wrap {name}: its text tower is {type(text).__name__} (e.g. a Hugging "
                        f"Face encoder), which promptkit cannot prompt. Supported: {SUPPORTED}.")
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    missing = [part for part in needed if not hasattr(text_module(model), part)]
    if missing or not hasattr(model, "visual"):
        raise TypeError(f"promptkit cannot wrap {name}: it has no {', '.join(missing or ['visual'])}. "
                        f"Supported: {SUPPORTED}.")
    pool = text_pool(model)
    if pool not in TEXT_POOLS:
        raise TypeError(f"text pool_type={pool!r} is not supported (need one of {TEXT_POOLS}). Supported: {SUPPORTED}.")
    if text is not None and (text.cls_emb is not None or text.use_pad_mask):
        raise TypeError(f"promptkit cannot wrap {name}: its text tower "
                        f"{'appends a class token (CoCa)' if text.cls_emb is not None else 'masks padding'}, "
                        f"which promptkit's text path does not reproduce. Supported: {SUPPORTED}.")


def check_config(arch: str) -> None:
    """Refuses, before building, an open_clip architecture whose text side promptkit cannot drive: a Hugging Face
    text tower, or a tokenizer other than CLIP's BPE (SigLIP's SentencePiece/Gemma, MobileCLIP2's, ...)."""
    import open_clip

    text_cfg = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        raise TypeError(f"{arch} has a Hugging Face text tower ({text_cfg['hf_model_name']}), which promptkit cannot "
                        f"prompt. Supported: {SUPPORTED}.")
    if text_cfg.get("hf_tokenizer_name"):
        raise TypeError(f"{arch} uses the tokenizer {text_cfg['hf_tokenizer_name']}; promptkit builds prompts with "
                        f"CLIP's BPE tokenizer only (Hugging Face / SentencePiece tokenizers need the transformers "
                        f"package and are not supported). Its towers are: FrozenCLIP wraps such a model trained with "
                        f"CLIP's tokenizer. Supported: {SUPPORTED}.")


def vision_kind(model: nn.Module) -> str:
    """'vit' (open_clip's VisionTransformer), 'modified_resnet', 'timm_vit' (open_clip's `TimmModel` around a
    timm VisionTransformer) or 'other' (any other tower: text-side methods only)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(model.visual, VisionTransformer):
        return "vit"
    if isinstance(model.visual, ModifiedResNet):
        return "modified_resnet"
    if _timm_vit(model.visual) is not None:
        return "timm_vit"
    return "other"


def _timm_vit(visual: nn.Module):
    """The timm VisionTransformer inside an open_clip `TimmModel`, else None."""
    try:
        from open_clip.timm_model import TimmModel
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # no timm: no timm towers either
        return None
    trunk = getattr(visual, "trunk", None)
    return trunk if isinstance(visual, TimmModel) and isinstance(trunk, VisionTransformer) else None


@dataclass(frozen=True)
class VisionSite:
    """Where visual prompts enter a ViT image tower.

    Attributes:
        embedded: module whose input is the token sequence after patch and position embedding (a pre-hook there
            inserts the prompt tokens, which carry no position): open_clip's `ln_pre`, timm's `norm_pre`.
        blocks: the transformer blocks (pre-hooks there replace deep prompts).
        prefix_tokens: tokens in front of the patches (class and register tokens); prompts go right after them.
        batch_first: whether the blocks see [N, L, D].
        pooled: module whose input is the sequence after the last block, where the prompt tokens are removed
            again so that pooling over tokens ('avg', 'map' attention pooling) sees the image tokens only: timm's
            `norm` (under 'token' pooling removing them changes nothing). None for open_clip's ViT, which takes
            visual prompts with class-token pooling only: they stay, as in the authors' code.
    """

    embedded: nn.Module
    blocks: nn.ModuleList
    prefix_tokens: int
    batch_first: bool
    pooled: nn.Module | None


def visual_prompt_problem(model: nn.Module) -> str | None:
    """Why visual prompts cannot go into `model`'s image tower, or None when they can."""
    kind = vision_kind(model)
    if kind == "vit":
        attn_pool, pool = getattr(model.visual, "attn_pool", None), getattr(model.visual, "pool_type", "tok")
        if attn_pool is not None or pool != "tok":
            # Prompt tokens would enter open_clip's pooling over tokens, which has no module to hook before it.
            return (f"its open_clip VisionTransformer pools by {'attention' if attn_pool is not None else repr(pool)}, "
                    f"and visual prompts are supported there with class-token pooling only")
        return None
    if kind == "timm_vit":
        return None
    trunk = getattr(model.visual, "trunk", None)
    around = f" around timm's {type(trunk).__name__}" if trunk is not None else ""
    return f"it has {type(model.visual).__name__}{around}"


def vision_site(model: nn.Module) -> VisionSite:
    kind = vision_kind(model)
    if kind == "vit":
        visual = model.visual
        return VisionSite(visual.ln_pre, visual.transformer.resblocks, 1, batch_first(visual.transformer), None)
    if kind == "timm_vit":
        trunk = _timm_vit(model.visual)
        return VisionSite(trunk.norm_pre, trunk.blocks, trunk.num_prefix_tokens, True, trunk.norm)
    raise TypeError(f"image tower {type(model.visual).__name__} takes no visual prompts")


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
    return text_module(model).transformer.resblocks


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    return vision_site(model).blocks


def vision_width(model: nn.Module) -> int:
    kind = vision_kind(model)
    if kind == "vit":
        return model.visual.conv1.out_channels
    if kind == "timm_vit":
        return _timm_vit(model.visual).embed_dim
    if kind == "modified_resnet":
        return model.visual.attnpool.c_proj.in_features
    return getattr(getattr(model.visual, "trunk", None), "num_features", None)


def patch_size(model: nn.Module) -> int:
    kind = vision_kind(model)
    size = _timm_vit(model.visual).patch_embed.patch_size if kind == "timm_vit" else model.visual.patch_size
    return size[0] if isinstance(size, (tuple, list)) else size


def embed_dim(model: nn.Module) -> int:
    text = text_module(model)
    proj = text.text_projection
    if proj is None:
        return text.token_embedding.embedding_dim
    return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]


def cast_dtype(model: nn.Module) -> torch.dtype:
    return text_module(model).transformer.get_cast_dtype()


def eot_index(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Position of the pooled token of each row, as open_clip pools it ('last': the context's last position,
    a padding token, as SigLIP's tokenizer pads every text to the full context)."""
    pool = text_pool(model)
    if pool == "eos":
        eos = model.text.eos_id if getattr(model, "text", None) is not None else model.text_eos_id
        return (tokens == eos).int().argmax(dim=-1)
    if pool in ("last", "first"):
        return torch.full(tokens.shape[:1], tokens.shape[1] - 1 if pool == "last" else 0, device=tokens.device)
    return tokens.argmax(dim=-1)


def text_length(model: nn.Module, eot: torch.Tensor, context_length: int) -> int:
    """Positions to encode for rows pooled at `eot`: up to the last pooled token under a causal mask (exact),
    the whole context without one."""
    return int(eot.max()) + 1 if text_is_causal(model) else context_length


def project_text(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    proj = text_module(model).text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def causal_mask(model: nn.Module, length: int, start: int = 0) -> torch.Tensor | None:
    """The text tower's attention mask of queries `start .. length-1` over keys `0 .. length-1` (None: no mask)."""
    mask = text_module(model).attn_mask
    return None if mask is None else mask[start:length, :length]


def text_tower(model: nn.Module, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """open_clip's text encoder after the token embedding, over the first `x.shape[1]` positions only."""
    text, length = text_module(model), x.shape[1]
    x = x + text.positional_embedding[:length].to(x.dtype)
    x = text.transformer(x, attn_mask=causal_mask(model, length))
    x = text.ln_final(x)
    return project_text(model, x[torch.arange(x.shape[0], device=x.device), eot])


def prefix_cache_supported(model: nn.Module) -> bool:
    """Whether a prompt prefix shared by many rows can be encoded once and its keys and values reused: the text
    tower has a causal mask (without one, earlier positions see later ones) and every text block is one whose
    attention `block_after_prefix` reproduces (`prefix_block_problem`)."""
    if causal_mask(model, 1) is None:
        return False
    return all(prefix_block_problem(block) is None for block in text_blocks(model))


# Everything open_clip's `Attention` holds in the variants its text towers build (q/k LayerNorm, scaled cosine
# attention, per-head output scale, inner LayerNorm; dropout, off in eval). An `Attention` with any other parameter
# or submodule computes something the prefix pass would silently leave out.
_ATTENTION_PARAMETERS = {"in_proj_weight", "in_proj_bias", "logit_scale", "head_scale"}
_ATTENTION_MODULES = {"ln_q", "ln_k", "attn_drop", "ln_inner", "out_proj", "out_drop"}


def prefix_block_problem(block: nn.Module) -> str | None:
    """Why `block_after_prefix` cannot run `block` (a text block), or None when it can: open_clip's
    `ResidualAttentionBlock` and `CustomResidualAttentionBlock` over `nn.MultiheadAttention` (open_clip 2.x and 3.x's
    default blocks) or open_clip's own `Attention` (3.x's custom blocks, and every block from 4.x on)."""
    from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

    if type(block) not in (ResidualAttentionBlock, CustomResidualAttentionBlock):
        return f"its forward ({type(block).__name__}) is not one the prefix pass reproduces"
    if hasattr(block, "ln_1_kv"):
        return "it is a cross-attention block: its keys and values come from another sequence"
    attn = block.attn
    if getattr(attn, "in_proj_weight", None) is None:  # separate q/k/v weights: only for keys of another width
        return f"its attention ({type(attn).__name__}) has no packed in_proj_weight: it is not self-attention"
    if isinstance(attn, nn.MultiheadAttention):
        if attn.bias_k is not None or attn.add_zero_attn:  # extra key/value rows appended after the sequence
            return "its nn.MultiheadAttention adds learned or zero key/value rows (add_bias_kv / add_zero_attn)"
        return None
    if type(attn) is not Attention:
        return f"its attention ({type(attn).__name__}) is not one the prefix pass reads"
    if hasattr(attn, "batch_first"):  # 2.x's (in no 2.x text tower) runs sequence-first and skips its `ln_inner`
        return "it is open_clip 2.x's Attention, which the prefix pass does not reproduce"
    extra = ({name for name, _ in attn.named_parameters(recurse=False)} - _ATTENTION_PARAMETERS) | (
        {name for name, _ in attn.named_children()} - _ATTENTION_MODULES)
    if extra:
        return f"its open_clip Attention has parts the prefix pass does not know ({', '.join(sorted(extra))})"
    return None


def text_block_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Runs the text transformer over batch-first `x` [N, L, D] (positions 0 .. L-1, causal mask) and returns
    each block's input [N, L, D] as the block saw it, after any prompt pre-hooks (registered earlier) ran."""
    transformer = text_module(model).transformer
    first = batch_first(transformer)
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


# The attention of `nn.MultiheadAttention` and of open_clip's `Attention` in four steps, each per position: the
# in-projection (both modules pack it alike in `in_proj_weight`, `in_proj_bias`), what each does to queries and to
# keys per head, and the output projection. Between them, the scores of suffix queries over prefix + suffix keys.


def _in_projection(attn: nn.Module, h: torch.Tensor, parts: slice) -> tuple[torch.Tensor, ...]:
    """The `parts` of (queries, keys, values) that `attn` projects from `h` [N, L, D], each [N, H, L, D/H]."""
    start, stop, _ = parts.indices(3)
    rows = slice(start * h.shape[-1], stop * h.shape[-1])
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[rows]
    out = F.linear(h, attn.in_proj_weight[rows], bias).chunk(stop - start, dim=-1)
    return tuple(_heads(t, attn.num_heads) for t in out)


def _queries(attn: nn.Module, q: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """Queries as `attn` scores them, and the scale of their dot products with `_keys` (None: 1/sqrt(D/H))."""
    logit_scale = getattr(attn, "logit_scale", None)
    if logit_scale is not None:  # scaled cosine attention: unit queries carry the per-head temperature
        return F.normalize(q, dim=-1) * logit_scale.clamp(max=attn.logit_scale_max).exp(), 1.0
    ln_q = getattr(attn, "ln_q", None)
    return (q if ln_q is None else ln_q(q)), None


def _keys(attn: nn.Module, k: torch.Tensor) -> torch.Tensor:
    if getattr(attn, "logit_scale", None) is not None:
        return F.normalize(k, dim=-1)
    ln_k = getattr(attn, "ln_k", None)
    return k if ln_k is None else ln_k(k)


def _out_projection(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The attention's output [N, S, D] from the attended values [N, H, S, D/H]."""
    head_scale = getattr(attn, "head_scale", None)
    if head_scale is not None:
        out = out * head_scale
    out = out.transpose(1, 2).flatten(2)
    ln_inner = getattr(attn, "ln_inner", None)
    return attn.out_proj(out if ln_inner is None else ln_inner(out))


def prefix_keys_values(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [N, H, L, D/H] that `block`'s attention computes from its input `h` [N, L, D]."""
    k, v = _in_projection(block.attn, block.ln_1(h), slice(1, 3))
    return _keys(block.attn, k), v


def block_after_prefix(block: nn.Module, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                       attn_mask: torch.Tensor, only: torch.Tensor | None = None) -> torch.Tensor:
    """`block` over the positions P .. P+S-1 of each row, `x` [N, S, D] (batch-first), whose attention also
    sees the positions 0 .. P-1 through their keys and values `past_k`, `past_v` [N, H, P, D/H];
    `attn_mask` [S, P+S] is the model's causal mask for those rows. The same computation as the block's
    own forward over all P+S positions, restricted to the last S outputs [N, S, D], or with `only` [N]
    (suffix index per row) to one output per row [N, 1, D] (the last block: only the pooled one is read)."""
    attn = block.attn
    q, k, v = _in_projection(attn, block.ln_1(x), slice(0, 3))
    if only is not None:
        rows = torch.arange(len(x), device=x.device)
        x, q = x[rows, only].unsqueeze(1), q[rows, :, only].unsqueeze(2)
        attn_mask = attn_mask[only].view(len(x), 1, 1, -1)  # each row's query position over all keys
    q, scale = _queries(attn, q)
    k = torch.cat([past_k, _keys(attn, k)], dim=2)
    v = torch.cat([past_v, v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), scale=scale)
    out = _out_projection(attn, out)
    ln_attn = getattr(block, "ln_attn", None)  # CustomResidualAttentionBlock's norm after attention
    x = x + block.ls_1(out if ln_attn is None else ln_attn(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))

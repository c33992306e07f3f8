"""FrozenCLIP: a frozen open_clip CLIP with a fast, hookable text path; and `load_clip`."""
from __future__ import annotations

import os
import warnings
import zipfile
from typing import Sequence

import open_clip
import torch
from torch import nn
import torch.nn.functional as F

from . import _compat
from .hooks import Hook, inject

# Tiny random models for tests and examples: (embed_dim, vision_cfg, text_cfg), built in-process.
_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
TEST_MODELS = {
    "test-vit": (32, dict(image_size=32, patch_size=8, width=64, head_width=32, layers=3), _TEXT),
    "test-rn": (32, dict(image_size=32, layers=(1, 1, 1, 1), width=16, head_width=16), _TEXT),
    # timm image towers (see promptkit.tiny): a ViT with class + register tokens pooled by averaging, a
    # SigLIP-shaped pair (attention-pooled ViT without class token; text tower without causal mask, pooled at
    # the last position; logit bias; embed_dim = tower width, as SigLIP projects neither), and a ConvNeXt
    # (text-side methods only).
    "test-timm-vit": (32, dict(image_size=32, timm_model_name="promptkit_test_vit", timm_pool="avg",
                               timm_proj="linear"), _TEXT),
    "test-siglip": (64, dict(image_size=32, timm_model_name="promptkit_test_siglip_vit", timm_pool="map",
                             timm_proj="none"),
                    dict(_TEXT, context_length=32, no_causal_mask=True, pool_type="last", proj_bias=True),
                    dict(custom_text=True, init_logit_bias=-10.0)),
    "test-convnext": (32, dict(image_size=32, timm_model_name="promptkit_test_convnext", timm_pool="",
                               timm_proj="linear"), _TEXT),
}
TINY_PRETRAINED = "promptkit-tiny"


class FrozenCLIP(nn.Module):
    """Wraps an open_clip `CLIP` model and freezes it (eval mode, no gradients).

    Args:
        model: an open_clip `CLIP` or `CustomTextCLIP` with open_clip's text transformer and any image tower
            (see `_compat.SUPPORTED`; visual prompts need a ViT tower).
        tokenizer: open_clip tokenizer; defaults to CLIP's BPE tokenizer (ships with open_clip).
        preprocess: image transform; defaults to open_clip's eval transform for the model.
        arch: architecture name, recorded in checkpoints when known.
        pretrained: pretrained tag or file, recorded in checkpoints when known.
        shared_prefix: encode a prompt prefix common to many rows once (see `encode_text`); False always
            runs every row over all its positions (the benchmarks compare both). Can be set later.
    """

    def __init__(self, model: nn.Module, tokenizer=None, preprocess=None, *, arch: str | None = None,
                 pretrained: str | None = None, shared_prefix: bool = True):
        super().__init__()
        _compat.check_supported(model)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # Read the token layout now, while no prompt hook is on the blocks.
        _compat.batch_first(_compat.text_module(model).transformer)
        if _compat.vision_kind(model) == "vit":
            _compat.batch_first(model.visual.transformer)
        self.tokenizer = tokenizer or open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        check_tokenizer(self.tokenizer, self.token_embedding.num_embeddings)
        if preprocess is None:
            cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
            preprocess = open_clip.image_transform(
                model.visual.image_size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"))
        self.preprocess = preprocess
        self.arch, self.pretrained = arch, pretrained
        self.shared_prefix = shared_prefix
        # Rows of the prompt table being encoded, so context hooks can pick per-row prompts
        # when the text path encodes prompts in length groups (None = all rows, in order).
        self.text_rows: torch.Tensor | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout and patch dropout stay off whatever the learner's mode
        return self

    # -- model facts -------------------------------------------------------------------------
    @property
    def token_embedding(self) -> nn.Embedding:
        return _compat.text_module(self.model).token_embedding

    @property
    def text_width(self) -> int:
        return self.token_embedding.embedding_dim

    @property
    def embed_dim(self) -> int:
        return _compat.embed_dim(self.model)

    @property
    def context_length(self) -> int:
        return _compat.text_module(self.model).positional_embedding.shape[0]

    @property
    def vision_kind(self) -> str:
        return _compat.vision_kind(self.model)

    @property
    def vision_width(self) -> int:
        return _compat.vision_width(self.model)

    @property
    def text_blocks(self) -> nn.ModuleList:
        return _compat.text_blocks(self.model)

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self.vision_site.blocks

    @property
    def vision_site(self) -> _compat.VisionSite:
        """Where visual prompts enter the image tower (see `_compat.VisionSite`)."""
        self.require_vit("visual prompts")
        return _compat.vision_site(self.model)

    @property
    def text_batch_first(self) -> bool:
        return _compat.batch_first(_compat.text_module(self.model).transformer)

    @property
    def vision_batch_first(self) -> bool:
        return self.vision_site.batch_first

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return _compat.cast_dtype(self.model)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def require_vit(self, what: str) -> None:
        problem = _compat.visual_prompt_problem(self.model)
        if problem:
            raise TypeError(
                f"{what} need a ViT image tower (open_clip's VisionTransformer or a timm VisionTransformer in "
                f"open_clip's TimmModel, as in SigLIP), but {problem}. Use a ViT model (e.g. ViT-B-16, "
                f"ViT-B-16-SigLIP) or a text-side method (zeroshot, coop, kgcoop, prograd, cocoop; tpt, zero, tda; "
                f"the feature-level heads).")

    def signature(self) -> dict:
        """Structural identity, stored in checkpoints and compared on load."""
        return {
            "text_width": self.text_width, "embed_dim": self.embed_dim, "context_length": self.context_length,
            "vocab_size": self.token_embedding.num_embeddings, "vision": self.vision_kind,
            "vision_width": self.vision_width, "text_layers": len(self.text_blocks),
            "vision_layers": (len(_compat.vision_blocks(self.model)) if self.vision_kind in ("vit", "timm_vit")
                              else None),
        }

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length]. A text longer than the context is refused, not silently truncated
        (two long class names would otherwise get identical features)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.context_length
        tokens = self.tokenizer(texts, context_length=length + 1)
        too_long = tokens[:, length].nonzero().flatten().tolist()
        if too_long:
            text = texts[too_long[0]]
            raise ValueError(f"prompt {text!r} has {len(self.word_ids(text)) + 2} tokens, more than the model's "
                             f"context length {length}; shorten the class name or the template")
        return tokens[:, :length].to(self.device)

    def word_ids(self, text: str) -> list[int]:
        """BPE ids of `text` without start/end tokens."""
        return self.tokenizer.encode(text)

    @property
    def sot_id(self) -> int:
        return self.tokenizer.sot_token_id

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_token_id

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        return _compat.eot_index(self.model, tokens)

    # -- encoders ----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True, hooks: Sequence[Hook] = ()) -> torch.Tensor:
        """Image features [B, D]; `hooks` (e.g. visual prompts) are active while encoding.

        Raises:
            ValueError: the images hold NaN or infinite values (they would give NaN logits and a
                meaningless prediction, or a NaN loss blamed on the learning rate).
        """
        check_finite(images)
        with inject(hooks):
            features = self.model.encode_image(images.to(self.device, self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, hooks: Sequence[Hook] = ()) -> torch.Tensor:
        """Text features [N, D] of `tokens` [N, context_length], over the first `max(EOT) + 1` positions only.

        Under CLIP's causal mask the pooled EOT feature never sees later positions, so
        truncating is exact up to float rounding. Rows are sorted by length and encoded in
        a few groups, each truncated to its own longest prompt, so one long class name
        does not make every prompt pay for it. Text towers without a causal mask (SigLIP)
        encode the full context (`_compat.text_length`). `hooks` are active while encoding.

        Shared prefix: the first P positions have the same token ids in every row (e.g. "[SOS] X X X X" of
        CoOp's context in front of the class name) and every text hook changes only positions < P, the same
        way for all rows or for all rows of a group (`Hook.positions`, `Hook.row_groups`: one context per
        image in CoCoOp and TPT). Under the causal mask those P positions' hidden states do not depend on
        what follows, so the prefix is encoded once per group and each row only over its own suffix,
        attending to the prefix's cached keys and values: the same numbers up to float rounding, and
        gradients reach the prompts through the one prefix pass. Rows are encoded in full where that does
        not hold (class-specific contexts, context after the first class token, a hook that does not say
        what it changes, a text tower without causal mask), or with `shared_prefix=False`.
        """
        tokens = tokens.to(self.device)
        eot = self.eot_index(tokens)
        order = torch.argsort(eot)
        lengths = eot[order].tolist()
        n_groups = min(4, max(1, len(lengths) // 64)) if lengths[-1] - lengths[0] > 8 else 1
        hooks = list(hooks)
        shared = self._shared_prefix(tokens, lengths[0], hooks)
        parts = []
        with inject(hooks):
            past = None if shared is None else self._encode_prefix(tokens, *shared)
            for rows in torch.tensor_split(order, n_groups):
                if shared is None:
                    parts.append(self._encode_rows(tokens, rows, eot[rows]))
                else:
                    parts.append(self._encode_suffix(tokens, rows, eot[rows], shared, past))
        features = torch.cat(parts)[torch.argsort(order)]
        return F.normalize(features, dim=-1) if normalize else features

    def _encode_rows(self, tokens: torch.Tensor, rows: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        model, length = self.model, _compat.text_length(self.model, eot, self.context_length)
        self.text_rows = rows
        try:
            x = self.token_embedding(tokens[rows, :length]).to(self.dtype)
        finally:
            self.text_rows = None
        return _compat.text_tower(model, x, eot)

    def _shared_prefix(self, tokens: torch.Tensor, shortest: int, hooks: list[Hook]):
        """(P, group of each row [N], first row of each group [G]) when rows can share their first P positions
        (see `encode_text`), else None. Decided from the token ids and what the hooks say they change."""
        if not self.shared_prefix or len(tokens) < 2 or not _compat.prefix_cache_supported(self.model):
            return None
        differs = (tokens != tokens[:1]).any(0).nonzero()
        # The pooled (EOT) position must be a suffix position: the prefix ends before the shortest row's EOT.
        prefix = min(int(differs[0]) if len(differs) else tokens.shape[1], shortest)
        blocks = list(self.text_blocks)
        text_modules = None
        ids = []
        for hook in hooks:
            if (hook.module is self.token_embedding and not hook.pre) or (
                    hook.pre and any(hook.module is block for block in blocks)):
                if hook.positions is None or hook.positions[1] > prefix:
                    return None
                if hook.row_groups is not None:
                    if len(hook.row_groups) != len(tokens):
                        return None
                    ids.append(hook.row_groups.to(tokens.device))
            else:
                if text_modules is None:
                    text = _compat.text_module(self.model)
                    text_modules = {id(m) for part in (text.token_embedding, text.transformer, text.ln_final)
                                    for m in part.modules()}
                if id(hook.module) in text_modules:  # a hook the prefix path does not know: full rows
                    return None
        if prefix < 1:
            return None
        if ids:
            _, groups = torch.unique(torch.stack(ids), dim=1, return_inverse=True)
        else:
            groups = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        n = int(groups.max()) + 1
        if n >= len(tokens):  # every row its own prefix: nothing to share
            return None
        first = torch.full((n,), len(tokens), device=tokens.device).scatter_reduce(
            0, groups, torch.arange(len(tokens), device=tokens.device), "amin")
        return prefix, groups, first

    def _encode_prefix(self, tokens: torch.Tensor, prefix: int, groups: torch.Tensor, first: torch.Tensor):
        """Keys and values [G, H, P, D/H] per text block of each group's prefix, hooks applied."""
        text = _compat.text_module(self.model)
        self.text_rows = first
        try:
            x = text.token_embedding(tokens[first, :prefix]).to(self.dtype)
        finally:
            self.text_rows = None
        x = x + text.positional_embedding[:prefix].to(x.dtype)
        inputs = _compat.text_block_inputs(self.model, x)
        return [_compat.prefix_keys_values(block, h) for block, h in zip(self.text_blocks, inputs)]

    def _encode_suffix(self, tokens: torch.Tensor, rows: torch.Tensor, eot: torch.Tensor, shared, past):
        """Features of `rows` encoded over positions P .. max(EOT) only, attending to their group's prefix."""
        model, text = self.model, _compat.text_module(self.model)
        prefix, groups, first = shared
        end = int(eot.max()) + 1
        # The module's own forward, without hooks: they change only prefix positions, already encoded.
        x = text.token_embedding.forward(tokens[rows, prefix:end]).to(self.dtype)
        x = x + text.positional_embedding[prefix:end].to(x.dtype)
        mask = _compat.causal_mask(model, end, start=prefix)
        owner, last = groups[rows], len(past) - 1
        for i, (block, (k, v)) in enumerate(zip(self.text_blocks, past)):
            if len(first) == 1:
                k, v = k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1)
            else:
                k, v = k[owner], v[owner]
            # Only the pooled (EOT) position of the last block's output is read: compute that one alone.
            x = _compat.block_after_prefix(block, x, k, v, mask, only=eot - prefix if i == last else None)
        return _compat.project_text(model, text.ln_final(x[:, 0]))

    @torch.no_grad()
    def zero_shot_text_features(self, classnames: Sequence[str], templates: Sequence[str],
                                normalize_each: bool = True) -> torch.Tensor:
        """CLIP's template ensemble: mean of normalised features over templates, renormalised. [C, D]
        With `normalize_each=False`, the mean of the raw features, normalised once (PromptSRC's target)."""
        prompts = [t.format(c) for c in classnames for t in templates]
        features = self.encode_text(self.tokenize(prompts), normalize=normalize_each)
        return F.normalize(features.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """Raises when prompts cannot be built with `tokenizer` for a text tower of `vocab_size` tokens."""
    ids = [getattr(tokenizer, name, None) for name in ("sot_token_id", "eot_token_id")]
    if None in ids:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no start/end-of-text ids: promptkit builds prompts "
                        f"with CLIP's BPE tokenizer (open_clip's SimpleTokenizer); SentencePiece and Hugging Face "
                        f"tokenizers (SigLIP's) are not supported")
    if max(ids) >= vocab_size:
        raise ValueError(f"the tokenizer's ids reach {max(ids)} but the text tower has {vocab_size} token embeddings: "
                         f"the model was trained with another tokenizer (e.g. SigLIP's SentencePiece), which "
                         f"promptkit does not support; use a model trained with CLIP's BPE tokenizer")


def check_finite(images: torch.Tensor) -> None:
    """Raises a ValueError naming the images of a batch that hold NaN or infinite values."""
    if images.is_floating_point() and not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{len(bad)} of {len(images)} images contain NaN or infinite values (batch positions "
                         f"{bad[:5]}); check the image loading and normalisation")


def _open_clip_model(arch: str, pretrained: str | None, device, precision: str, cache_dir, quick_gelu):
    local = bool(pretrained) and os.path.isfile(pretrained)
    if pretrained and not local:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained.lower().replace("-", "_") not in tags:  # open_clip's own tag normalisation
            if os.sep in pretrained or os.path.splitext(pretrained)[1] in (".bin", ".pt", ".pth", ".safetensors"):
                raise FileNotFoundError(f"pretrained file {pretrained} does not exist")
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {arch}: use a local checkpoint file or "
                             f"one of {', '.join(tags) or '(none: this architecture has no released weights)'}")
        if quick_gelu is None:
            # OpenAI weights were trained with QuickGELU; open_clip 3.x would otherwise build GELU and only warn.
            quick_gelu = bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))
    if local:
        # A local file carries no tag. OpenAI's releases are TorchScript archives (a zip with code/ and
        # constants.pkl: read by name, never unpickled) named after the architecture; a converted copy is
        # recognised by "openai" in its name (as the conversion below suggests).
        try:
            with zipfile.ZipFile(pretrained) as archive:
                torchscript = any("/code/" in n or n.endswith("constants.pkl") for n in archive.namelist())
        except zipfile.BadZipFile:
            torchscript = False
        named = os.path.basename(pretrained) in {f"{name}.pt" for name in (
            "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336px", "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
        } or "openai" in os.path.basename(pretrained).lower()
        if quick_gelu is None and (torchscript or named):
            quick_gelu = True
            warnings.warn(f"{pretrained} looks like OpenAI's weights ("
                          f"{'a TorchScript archive' if torchscript else 'its name'}): building {arch} with QuickGELU, "
                          f"as they were trained; pass quick_gelu=False (CLI: --no-quick-gelu) to build GELU")
        elif quick_gelu is None:
            warnings.warn(f"building {arch} with GELU for {pretrained}; if it holds OpenAI weights pass "
                          f"quick_gelu=True (CLI: --quick-gelu), they were trained with QuickGELU")
    kwargs = dict(precision=precision, device=device or "cpu", force_quick_gelu=bool(quick_gelu), cache_dir=cache_dir)
    try:
        return open_clip.create_model_and_transforms(arch, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if local and torchscript:  # open_clip reads these only through pickle (weights_only=False)
            keep = "if k not in ('input_resolution', 'context_length', 'vocab_size')"
            raise ValueError(
                f"{pretrained} is a TorchScript archive (OpenAI's release format), which loads only by running its "
                f"pickled code; promptkit never does that. Convert it once, where you trust the file: python -c "
                f"\"import torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, v in torch.jit.load("
                f"'{pretrained}', map_location='cpu').state_dict().items() {keep}}}, '{arch}-openai.safetensors')\" "
                f"and pass {arch}-openai.safetensors") from err
        if local:
            raise ValueError(f"cannot load {pretrained} as {arch} weights: {str(err).splitlines()[0]}") from err
        if pretrained:
            raise RuntimeError(
                f"could not load pretrained weights {pretrained!r} for {arch} ({err}). promptkit never needs the "
                f"network: download the checkpoint once and pass its path, e.g. "
                f"load_clip({arch!r}, pretrained='/path/to/{arch}.bin') (CLI: --pretrained /path/to/{arch}.bin), "
                f"or pass cache_dir= (CLI: --cache-dir) where open_clip already cached it.") from err
        raise


def load_clip(arch: str, pretrained: str | None = None, *, device=None, precision: str = "fp32",
              cache_dir: str | None = None, quick_gelu: bool | None = None) -> FrozenCLIP:
    """Builds a frozen open_clip model.

    Args:
        arch: open_clip architecture (`ViT-B-16`, `RN50`, ...), `"promptkit-tiny"` (the small
            pretrained model shipped with promptkit) or a test model (tiny, random: `"test-vit"`, `"test-rn"`;
            timm towers `"test-timm-vit"`, `"test-siglip"`, `"test-convnext"`).
        pretrained: open_clip pretrained tag (`"openai"`, `"laion2b_s34b_b88k"`, ...) or a local
            checkpoint file. None gives random weights.
        device: where to put the model (default CPU).
        precision: "fp32", "fp16" or "bf16" weights.
        cache_dir: open_clip's download cache.
        quick_gelu: force QuickGELU (True) or GELU (False). By default taken from the pretrained tag (True
            for OpenAI weights); for a local file, True when it is an OpenAI release (a TorchScript archive,
            or named like `ViT-B-32.pt`), with a warning saying which activation was built.
    """
    if arch == TINY_PRETRAINED or arch in TEST_MODELS:
        given = [f"{name} (CLI: --{name.replace('_', '-')})" for name, value in (
            ("pretrained", pretrained), ("cache_dir", cache_dir), ("quick_gelu", quick_gelu)) if value is not None]
        if given:
            raise ValueError(f"{arch!r} is built into promptkit, weights and activation included; it takes no "
                             f"{', '.join(given)}")
    if arch == TINY_PRETRAINED:
        from .tiny import load_tiny_clip

        model = load_tiny_clip().to(device or "cpu")
        return FrozenCLIP(_cast(model, precision), arch=arch, pretrained="embedded")
    if arch in TEST_MODELS:
        from .tiny import build_test_model

        embed_dim, vision_cfg, text_cfg, *options = TEST_MODELS[arch]
        with torch.random.fork_rng(devices=[]):  # same weights every time, caller's RNG untouched
            torch.manual_seed(0)
            model = build_test_model(embed_dim, vision_cfg, text_cfg, **(options[0] if options else {}))
        return FrozenCLIP(_cast(model.to(device or "cpu"), precision), arch=arch)
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown architecture {arch!r}: use one of open_clip.list_models(), "
                         f"{TINY_PRETRAINED!r} or {sorted(TEST_MODELS)}")
    _compat.check_config(arch)
    model, _, preprocess = _open_clip_model(arch, pretrained, device, precision, cache_dir, quick_gelu)
    return FrozenCLIP(model, preprocess=preprocess, arch=arch, pretrained=pretrained)


def _cast(model: nn.Module, precision: str) -> nn.Module:
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of {sorted(dtypes)}, got {precision!r}")
    return model.to(dtypes[precision])

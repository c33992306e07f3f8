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
    """

    def __init__(self, model: nn.Module, tokenizer=None, preprocess=None, *, arch: str | None = None,
                 pretrained: str | None = None):
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
        """
        tokens = tokens.to(self.device)
        eot = self.eot_index(tokens)
        order = torch.argsort(eot)
        lengths = eot[order].tolist()
        n_groups = min(4, max(1, len(lengths) // 64)) if lengths[-1] - lengths[0] > 8 else 1
        parts = []
        with inject(hooks):
            for rows in torch.tensor_split(order, n_groups):
                parts.append(self._encode_rows(tokens, rows, eot[rows]))
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

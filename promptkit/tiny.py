"""`promptkit-tiny`: a small CLIP pretrained contrastively on the procedural benchmark, shipped in the package.

Trained by scripts/pretrain_tiny_clip.py (see its docstring for what is held out). Loaded from
safetensors + JSON only.
"""
from __future__ import annotations

import json
from importlib import resources

import open_clip
import timm
import torch

from .checkpoint import load_tensors

CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "head_width": 32, "layers": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    "quick_gelu": False,
}


def _asset(name: str):
    return resources.files(__package__).joinpath("assets", name)


def build_tiny_clip(config: dict | None = None) -> open_clip.model.CLIP:
    """The architecture, with random weights."""
    cfg = config or CONFIG
    return open_clip.model.CLIP(cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                                quick_gelu=cfg["quick_gelu"])


def load_tiny_clip() -> open_clip.model.CLIP:
    """The architecture with the shipped weights (fp32, eval mode). Tokens never seen in pretraining
    have zero embeddings."""
    weights = _asset("promptkit_tiny.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"embedded weights missing at {weights}; run scripts/pretrain_tiny_clip.py")
    config = json.loads(_asset("promptkit_tiny.json").read_text())
    state = load_tensors(weights)
    rows = state.pop("token_embedding.rows")
    embedding = torch.zeros(config["text_cfg"]["vocab_size"], config["text_cfg"]["width"])
    embedding[rows] = state.pop("token_embedding.weight").float()
    state["token_embedding.weight"] = embedding
    with torch.random.fork_rng(devices=[]):
        model = build_tiny_clip(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


# Tiny timm image towers for in-process tests, built by timm from its own architectures with small dimensions
# and registered under these names (on first use) so that open_clip's `TimmModel` can create them.
def promptkit_test_vit(pretrained: bool = False, **kwargs):
    """A timm ViT with a class token and 2 register tokens, 3 blocks, width 64."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{
        "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2, "reg_tokens": 2, **kwargs})


def promptkit_test_siglip_vit(pretrained: bool = False, **kwargs):
    """A timm ViT shaped like SigLIP's: no class token, attention ('map') pooling, 3 blocks, width 64."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{
        "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2, "class_token": False,
        "global_pool": "map", **kwargs})


def promptkit_test_convnext(pretrained: bool = False, **kwargs):
    """A timm ConvNeXt with one block per stage."""
    return timm.create_model("convnext_atto", pretrained=False, **{"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64),
                                                                   **kwargs})


TIMM_TEST_TOWERS = (promptkit_test_vit, promptkit_test_siglip_vit, promptkit_test_convnext)


def build_test_model(embed_dim: int, vision_cfg: dict, text_cfg: dict, custom_text: bool = False, **kwargs):
    """An open_clip `CLIP` (or `CustomTextCLIP`) from configs, registering the tiny timm towers first."""
    from timm.models import is_model, register_model

    for entrypoint in TIMM_TEST_TOWERS:
        if not is_model(entrypoint.__name__):
            register_model(entrypoint)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    return cls(embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, **kwargs)


@torch.no_grad()
def zero_shot_report(model) -> dict:
    """Zero-shot top-1 (%) with "a photo of a {}." on each split of the procedural benchmark."""
    from .clip import FrozenCLIP
    from .data.procedural import DOMAINS, ProceduralBenchmark

    was_training = model.training
    clip = FrozenCLIP(model.eval())
    bench = ProceduralBenchmark()
    report = {}
    for name, kwargs in [("test", {}), ("shifted", {})] + [(d, {"domain": d}) for d in DOMAINS[1:]] + [
            ("base", {"classes": "base"}), ("novel", {"classes": "novel"})]:
        data = bench.split("shifted" if name in DOMAINS or name == "shifted" else "test", **kwargs)
        text = clip.zero_shot_text_features(data.classnames, ["a photo of a {}."])
        predictions = (clip.encode_image(data.images) @ text.t()).argmax(-1)
        report[name] = round(100 * (predictions == torch.tensor(data.targets)).float().mean().item(), 2)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train(was_training)
    return report

"""Prompt checkpoints: safetensors + JSON only, written atomically, checked against the base model."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "prompt_weights.safetensors"
CONFIG_NAME = "prompt_config.json"


def atomic_write(path, write) -> None:
    """Calls `write(tmp_path)` then renames over `path`: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # After writing: mkstemp's 0600 would make saved prompts unreadable to others, and some writers
        # (safetensors) replace the file, so a mode set before would be lost.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def load_tensors(path) -> dict[str, torch.Tensor]:
    """Loads a safetensors file; anything else (a pickle named .safetensors, a truncated file) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err}). promptkit never unpickles files; "
                         f"re-save the prompts with save_pretrained().") from err


def save_json(obj, path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def load_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {Path(path).name} at {path}; is this a promptkit save_pretrained directory?")
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def save_pretrained(learner, directory) -> None:
    import open_clip

    from . import __version__

    directory = Path(directory)
    clip = learner.clip
    save_tensors(learner.prompt_state_dict(), directory / WEIGHTS_NAME, metadata={"method": learner.method})
    save_json({
        "method": learner.method,
        "hparams": learner.hparams,
        "classnames": learner.classnames,
        "promptkit_version": __version__,
        "open_clip_version": open_clip.__version__,
        "base_model": {"arch": clip.arch, "pretrained": clip.pretrained, "signature": clip.signature()},
    }, directory / CONFIG_NAME)


def export_head(learner, directory) -> None:
    """`learner.linear_head()` as `head.safetensors` + `head.json`: what a deployment pipeline loads beside a
    plain open_clip model (see `PromptLearner.export_head`)."""
    import open_clip

    from . import __version__

    directory = Path(directory)
    weight, bias = learner.linear_head()
    clip = learner.clip
    save_tensors({"weight": weight.float(), "bias": bias.float()}, directory / "head.safetensors")
    save_json({
        "logits": "F.normalize(model.encode_image(images), dim=-1) @ weight.T + bias",
        "method": learner.method,
        "classnames": learner.classnames,
        "promptkit_version": __version__,
        "open_clip_version": open_clip.__version__,
        "base_model": {"arch": clip.arch, "pretrained": clip.pretrained, "signature": clip.signature()},
    }, directory / "head.json")


def load_pretrained(directory, clip, strict: bool = True, classnames: Sequence[str] | None = None):
    """Rebuilds the learner saved in `directory` on `clip`.

    Args:
        directory: a `save_pretrained` directory.
        clip: the FrozenCLIP to attach to; its structure must match the saved base model.
        strict: refuse a base model whose signature differs. With False, load anyway where the
            tensor shapes still fit.
        classnames: override the saved class names (same count for class-specific prompts).
    """
    from .registry import METHODS, _load_builtin

    _load_builtin()
    directory = Path(directory)
    config = load_json(directory / CONFIG_NAME)
    saved = config.get("base_model", {}).get("signature", {})
    current = clip.signature()
    diff = {k: (saved.get(k), current.get(k)) for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)}
    if diff and strict:
        detail = ", ".join(f"{k}: saved {a} vs given {b}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"prompts in {directory} were trained on a different base model "
            f"({config['base_model'].get('arch')} / {config['base_model'].get('pretrained')}): {detail}. "
            f"Load the matching model, or pass strict=False (CLI: --no-strict) if the shapes still fit.")
    hparams = _upgrade(config, clip)
    learner = METHODS.get(config["method"])(clip, list(classnames or config["classnames"]), **hparams)
    state = load_tensors(directory / WEIGHTS_NAME)
    if str(config.get("promptkit_version", "")).startswith("0.1."):  # PromptSRC's GPA sums moved into its objective
        own = learner.prompt_state_dict().keys()
        state = {key if key in own else next((k for k in own if k.endswith("." + key)), key): v
                 for key, v in state.items()}
    learner.load_prompt_state_dict(state, strict=strict)
    return learner


# Keywords renamed since promptkit 0.1 (one name per concept across methods).
_RENAMED = {"vpt": {"n_tokens": "n_vision", "depth": "vision_depth"}, "ivlp": {"vision_init_std": "init_std"},
            "cavpt": {"n_vpt": "n_vision", "aux_weight": "weight"}, "prograd": {"lambda_": "weight"}}


def _upgrade(config: dict, clip) -> dict:
    """Keywords of a save made by promptkit 0.1, in today's names and meaning: there `ctx_init` set the CoOp
    family's `n_ctx`, and IVLP's depth None meant 9 layers."""
    hparams = dict(config["hparams"])
    if not str(config.get("promptkit_version", "")).startswith("0.1."):
        return hparams
    for old, new in _RENAMED.get(config["method"], {}).items():
        if old in hparams:
            hparams[new] = hparams.pop(old)
    if hparams.get("ctx_init") and config["method"] in ("coop", "kgcoop", "prograd", "cocoop", "cavpt"):
        hparams["n_ctx"] = None
    if config["method"] == "cavpt":
        hparams["class_text"] = "normalized"
    if config["method"] == "ivlp":
        for key, blocks in (("text_depth", clip.text_blocks), ("vision_depth", clip.vision_blocks)):
            if hparams.get(key, 0) is None:
                hparams[key] = min(9, len(blocks))
    return hparams


def import_coop_checkpoint(path, clip, classnames: Sequence[str], **kwargs):
    """Builds a CoOp learner from a CoOp/TPT research checkpoint (a Dassl `model.pth.tar-N` whose
    `state_dict["ctx"]` is the context). Read with `torch.load(weights_only=True)`: nothing is executed."""
    from .learners.coop import CoOp

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(
            f"refusing {path}: it cannot be read as plain tensors (torch.load weights_only=True failed: "
            f"{str(err).splitlines()[0]}). promptkit does not unpickle arbitrary objects; re-save just the "
            f"context with torch.save({{'state_dict': {{'ctx': ctx}}}}, path) in a trusted environment.") from err
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    ctx = None if state is None else state.get("ctx", state.get("prompt_learner.ctx"))
    if not isinstance(ctx, torch.Tensor):
        raise ValueError(f"{path} has no state_dict['ctx'] tensor; is it a CoOp prompt_learner checkpoint?")
    if ctx.shape[-1] != clip.text_width:
        raise ValueError(f"{path}: context width {ctx.shape[-1]} does not match the model's text width "
                         f"{clip.text_width}; load the base model the prompts were trained on")
    class_specific = ctx.dim() == 3
    if class_specific and ctx.shape[0] != len(classnames):
        raise ValueError(f"{path} holds class-specific context for {ctx.shape[0]} classes, got {len(classnames)} names")
    learner = CoOp(clip, classnames, n_ctx=ctx.shape[-2], class_specific=class_specific, **kwargs)
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    return learner

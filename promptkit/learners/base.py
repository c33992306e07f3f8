"""PromptLearner: what every method is, and the one interface the trainer and adapters use."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ..clip import FrozenCLIP


@dataclass
class LossOutput:
    """What `training_loss` returns: `loss` is what the trainer backpropagates, `logits` feed
    the running accuracy, `terms` are detached scalars for the log (e.g. `ce`, `kg`).

    A gradient rule that is not linear in the batch (ProGrad's projection) returns its losses as
    `gradient_terms` instead: the trainer then accumulates each term's gradient over micro-batches,
    averages it over processes, and calls the learner's `combine_gradients` once per step, so the rule
    sees the whole batch's gradients whatever the accumulation or number of processes. `loss` is then
    only logged and checked for finiteness.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient_terms: dict[str, torch.Tensor] | None = None


class PromptLearner(nn.Module):
    """Base of every method. A learner owns its prompt tensors and reads a shared `FrozenCLIP`.

    Subclasses override `text_features` (text side) and/or `encode_image` (image side), and for
    extra loss terms `training_loss`. Set `image_prompted = True` when the image path carries
    prompts: the trainer then never caches image features for it.

    Every constructor keyword is recorded in `hparams`, so `save_pretrained` / `load_pretrained`
    rebuild the method without further code.

    Every learner also takes `seed=`: the random initialisation of its prompts (and of any layers it
    owns) is then drawn from that seed, leaving the caller's random state untouched; without it, from the
    global generator. The seed is kept in `init_seed`.
    """

    method: str = ""
    image_prompted: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init, signature = cls.__init__, inspect.signature(cls.__init__)

        @functools.wraps(init)
        def recording_init(self, *args, seed: int | None = None, **kw):
            if seed is not None:
                with torch.random.fork_rng(devices=_cuda_devices()):
                    torch.manual_seed(seed)
                    recording_init(self, *args, **kw)
                self.init_seed = seed
                return
            init(self, *args, **kw)
            if type(self) is cls:  # the most-derived constructor records the keywords
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self.hparams = {k: _jsonable(v) for k, v in list(bound.arguments.items())[3:]
                                if signature.parameters[k].kind is not inspect.Parameter.VAR_KEYWORD}

        cls.__init__ = recording_init

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str]):
        super().__init__()
        if not isinstance(clip, FrozenCLIP):
            raise TypeError(f"expected a promptkit.FrozenCLIP, got {type(clip).__name__}; wrap an open_clip "
                            f"model with promptkit.FrozenCLIP(model) or use promptkit.load_clip(...)")
        self.clip = clip
        self.classnames = check_classnames(classnames)
        self.hparams: dict = {}
        self.init_seed: int | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    # -- parameters ----------------------------------------------------------------------------
    def prompt_parameters(self) -> list[nn.Parameter]:
        """The learned tensors: every parameter outside the frozen CLIP."""
        return [p for name, p in self.named_parameters() if not name.startswith("clip.")]

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Learned tensors (and persistent learner buffers) by name: what checkpoints store."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        own = self.prompt_state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = [f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
        if wrong or (strict and (missing or unexpected)):
            raise ValueError(f"prompt weights do not fit this {self.method or type(self).__name__} learner: "
                             f"missing {missing}, unexpected {unexpected}, shape mismatch {wrong}")
        with torch.no_grad():
            for k in own.keys() & state.keys():
                own[k].copy_(state[k])

    # -- forward -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, D] (with this learner's image prompts, if any)."""
        return self.clip.encode_image(images)

    def text_features(self) -> torch.Tensor:
        """Normalised class text features [C, D]."""
        raise NotImplementedError

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits [B, C], in fp32 even under autocast: at |logit| ~ 30, bf16's spacing of
        0.125 flips near-tied predictions, pseudo-labels and votes."""
        with torch.autocast(image_features.device.type, enabled=False):
            return self.clip.logit_scale.float() * image_features.float() @ text_features.float().t()

    def forward(self, images: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None,
                text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C]. Pass `image_features` (from `encode_image`) and/or `text_features`
        (from `text_features()`) to reuse them, e.g. once per evaluation instead of per batch."""
        if image_features is None:
            image_features = self.encode_image(images)
        if text_features is None:
            text_features = self.text_features()
        return self.logits(image_features, text_features)

    # -- training interface --------------------------------------------------------------------
    def training_loss(self, labels: torch.Tensor, images: torch.Tensor | None = None, *,
                      image_features: torch.Tensor | None = None) -> LossOutput:
        """The loss the trainer minimises. Default: cross-entropy. Regularised methods override
        this one method (and only this) to add their terms; `image_features` is given instead of
        `images` when the trainer serves cached features (never for `image_prompted` learners)."""
        logits = self(images, image_features=image_features)
        ce = F.cross_entropy(logits.float(), labels)
        return LossOutput(ce, logits, {"ce": ce.detach()})

    def combine_gradients(self, grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        """The gradient of each prompt parameter from the whole batch's gradients of each of the
        `gradient_terms` (same order as `prompt_parameters()`). Only for learners that return them."""
        raise NotImplementedError(f"{type(self).__name__} returned gradient_terms but does not combine them")

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch (0-based `epoch`), also the first one after a resume."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called by the trainer after each epoch (1-based `epoch`); e.g. prompt averaging."""

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Writes `prompt_weights.safetensors` (learned tensors only) and `prompt_config.json`."""
        from ..checkpoint import save_pretrained

        save_pretrained(self, directory)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, classes={self.n_classes}, hparams={self.hparams}"


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def check_classnames(classnames) -> list[str]:
    """Class names as prompts read them: `_` as a space (CoOp's split files and folder names use `apple_pie`,
    and every official learner tokenises `name.replace("_", " ")`), surrounding spaces removed.

    Raises:
        TypeError: a single string (it would become one class per character).
        ValueError: no names, an empty name, or two names that read the same.
    """
    if isinstance(classnames, (str, bytes)):
        raise TypeError(f"classnames must be a list of class names in label order, not the string {classnames!r}; "
                        f"e.g. ['cat', 'dog']")
    names = [" ".join(str(c).replace("_", " ").split()) for c in classnames]
    if not names:
        raise ValueError("classnames is empty: pass the list of class names, in label order")
    empty = [i for i, name in enumerate(names) if not name]
    if empty:
        raise ValueError(f"class names at labels {empty[:5]} are empty; give every class a name")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"labels {seen[name]} and {i} have the same class name {name!r}; class names must be "
                             f"distinct (prompts could not tell them apart)")
        seen[name] = i
    return names


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"learner keyword value {value!r} cannot be saved in prompt_config.json; "
                    f"pass plain numbers, strings or lists")

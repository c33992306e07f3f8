"""What the test-time adapters share: view generation, entropy-based confidence selection, autocast."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..clip import check_finite
from .augment import CLIP_MEAN, CLIP_STD, MODES, as_image_batch, make_views, photo_pixels


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last dim."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def select_confident(logits: torch.Tensor, selection: float) -> torch.Tensor:
    """Indices [B, K] of the K = int(V * selection) lowest-entropy views of logits [B, V, C] (TPT's rule;
    at least one view)."""
    k = max(1, int(logits.shape[1] * selection))
    return torch.argsort(entropy(logits), dim=1, stable=True)[:, :k]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the softmax over views, in log space: logits [B, K, C] -> [B].
    (TPT's `avg_entropy`, including its clamp that keeps 0 * log 0 from becoming NaN.)"""
    log_mean = torch.logsumexp(logits.log_softmax(-1), dim=1) - math.log(logits.shape[1])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum(-1)


def gather_views(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, V, ...] at view indices [B, K] -> [B, K, ...]."""
    return values[torch.arange(len(values), device=values.device)[:, None], index.to(values.device)]


class ViewAdapter(nn.Module):
    """Base of the adapters that look at augmented views of each test image.

    Args:
        learner: the prompt learner being adapted (never modified).
        n_views: views per image, the original included.
        augment: "crop", "augmix" or "auto": plain crops for ImageNet-scale label sets (>= 200 classes:
            ImageNet and its natural-shift variants) and AugMix for smaller, fine-grained sets. TPT
            decides by dataset name (AugMix for SUN397's 397 classes too): pass it explicitly to match.
        seed: seed of the view generator (a stream: later batches get new views).
        autocast: on CUDA, run the encoders under bf16 autocast (fp16 where bf16 is not native; TPT
            then scales its loss as TPT's GradScaler does), as the research code runs under AMP; logits,
            entropies, losses and the prompt update stay fp32.

    Attributes:
        episodic: True when every image is adapted afresh, so its answer depends neither on the images
            before it nor on the rest of its batch (TPT, Zero); False for a stream that learns from what it
            has seen (TDA). No adapter changes the learner.
    """

    episodic: bool = True

    def __init__(self, learner, n_views: int = 64, augment: str = "auto", seed: int = 0, autocast: bool = True):
        super().__init__()
        if getattr(learner, "batch_dependent", False):
            raise ValueError(f"{type(learner).__name__} generates its prompt from the whole test batch (the batch is "
                             f"its domain), so it has no image-by-image prediction for a test-time adapter; evaluate "
                             f"it on batches of one domain (PromptTrainer.evaluate, eval_batch_size)")
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if augment not in MODES:
            raise ValueError(f"augment must be one of {MODES}, got {augment!r}")
        if augment == "auto":
            augment = "crop" if learner.n_classes >= 200 else "augmix"
        self.learner, self.n_views, self.augment, self.seed, self.autocast = learner, n_views, augment, seed, autocast
        self.generator = torch.Generator().manual_seed(seed)
        self._text_cache = None  # (state key of the learner, its text features)

    def views(self, images) -> torch.Tensor:
        """[B, n_views, 3, H, W] views of PIL images or an image tensor (see `augment.as_image_batch`);
        crops of PIL images are cut from the full-resolution photo, as TPT does."""
        clip = self.learner.clip
        size = clip.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean, std = _normalisation(clip.preprocess)
        photos = photo_pixels(images)
        images = as_image_batch(images, clip.preprocess, size, mean, std).to(clip.device)
        check_finite(images)  # before the views: report positions in the caller's batch
        return make_views(images, self.n_views, self.augment, self.generator, mean, std, photos)

    def forward(self, images) -> torch.Tensor:
        """Logits [B, C] for PIL images or a preprocessed image tensor [B, 3, H, W]."""
        return self.adapt_views(self.views(images))

    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] from views [B, V, 3, H, W] (view 0: the un-augmented image)."""
        raise NotImplementedError

    def amp_dtype(self) -> torch.dtype | None:
        """The encoders' autocast dtype: None off CUDA or with autocast=False; bf16 where the GPU has it
        natively, else fp16 (V100, T4: emulated bf16 would be slow)."""
        if not (self.autocast and self.learner.clip.device.type == "cuda"):
            return None
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no emulation
            native = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float16

    def amp(self):
        """Autocast context for the encoders (a no-op when `amp_dtype()` is None)."""
        dtype = self.amp_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.learner.clip.device.type, dtype=dtype)

    def stream_state(self) -> dict[str, torch.Tensor]:
        """What a stream adapter (`episodic` False) has learned so far, as tensors, to resume the stream later
        (`adapt_dataset` saves it with each batch)."""
        raise NotImplementedError(f"{type(self).__name__} is a stream (episodic=False): define stream_state() and "
                                  f"load_stream_state() so that a run over a dataset can be saved and resumed")

    def load_stream_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continues the stream from a `stream_state()`."""
        raise NotImplementedError(f"{type(self).__name__} is a stream (episodic=False) without load_stream_state()")

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """The learner's class text features [C, D] (fp32), encoded once per state of its prompts: an
        adapter that does not tune them (Zero, TDA) would otherwise pay a text pass over all C classes
        per batch, more than encoding the batch itself for one view per image at C = 1000."""
        key = (self.amp_dtype(), PromptState(self.learner))
        if self._text_cache is None or self._text_cache[0] != key:
            with self.amp():
                self._text_cache = (key, self.learner.text_features().float())
        return self._text_cache[1]

    @torch.no_grad()
    def view_features(self, views: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, V, D] (fp32) of all views, encoded once."""
        b, v = views.shape[:2]
        with self.amp():
            features = self.learner.encode_image(views.flatten(0, 1))
        return features.float().view(b, v, -1)


class PromptState:
    """Which tensors a learner's prompts are and which values they hold: equal states mean equal values.
    Identity, storage and in-place version of each tensor, so an optimizer step, a `copy_`, a load, a move
    or a new Parameter changes the state. It holds the tensors, so no new tensor can take their identity
    or memory while a cached state lives."""

    def __init__(self, learner, tensors=None):
        if tensors is None:
            tensors = [t for name, t in [*learner.named_parameters(), *learner.named_buffers()]
                       if not name.startswith("clip.")]
        self.tensors = list(tensors)
        self.key = tuple((id(t), t.data_ptr(), t._version, t.device) for t in self.tensors)

    def __eq__(self, other) -> bool:
        return isinstance(other, PromptState) and self.key == other.key


def _normalisation(preprocess):
    for t in getattr(preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(t.mean), tuple(t.std)
    return CLIP_MEAN, CLIP_STD

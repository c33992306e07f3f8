"""TPT (Shu et al., NeurIPS 2022) and C-TPT (Yoon et al., ICLR 2024), batched and exact."""
from __future__ import annotations

import torch

from .._keywords import renamed
from ..learners.tuning import PromptTuning
from ..registry import register_adapter
from .base import PromptState, ViewAdapter, gather_views, marginal_entropy, select_confident


@register_adapter("tpt")
class TPT(ViewAdapter):
    """Test-time prompt tuning: per test image, tune the learner's text context to minimise the
    entropy of the averaged prediction over its most confident augmented views.

    The published procedure: per step, logits of all views with the current prompt; the
    `int(V * selection)` lowest-entropy views are chosen at step 0 and kept; loss = entropy of the
    mean softmax (log space); torch's AdamW (default betas, eps, weight decay) at `lr`; prompt and
    optimizer state reset for every sample; the prediction is view 0's with the adapted prompt.
    Episodic: the learner is unchanged afterwards. On CoCoOp, as TPT does, the tuned context is the
    image-conditioned one (context + Meta-Net(view 0)), shared by all views of that image; the Meta-Net
    sees view 0's normalised feature, as in CoCoOp (TPT's CoCoOp code feeds the unnormalised one).

    What is not recomputed (results are the same up to float rounding):
    - the views' image features: encoded once per sample, reused by every step and the prediction;
    - the step-0 text features: the prompt is reset before every sample, so they are the same for all
      samples; they are encoded once (until the learner's context changes) and each sample's gradient
      is a vector-Jacobian product through that one pass (batched over the samples);
    - the text encoder runs over the first `max(EOT) + 1` tokens only.
    B samples are adapted together, each with its own context copy: one text pass over B x C prompts
    per later step, and one AdamW over the [B, ...] copies, which is B independent AdamWs because
    AdamW is elementwise. Memory grows with B x C at steps >= 2 and in the final prediction.

    The learner says what is tuned and how (`learners.tuning.PromptTuning`). Learners that are not
    `batched_tuning` (image prompts: MaPLe, IVLP, PromptSRC, CAVPT, ...; other text-side prompts than
    CoOp's context) take a slower, equally exact path: one sample at a time through the learner's own
    forward, the views re-encoded at every step (only the selected ones after step 0), since their image
    features may depend on the tuned context.

    Args:
        learner: a learner with a tunable text prompt (`PromptTuning`: the CoOp family, CoCoOp, IVLP,
            MaPLe, ...); for learners without one (zero-shot CLIP, VPT) use Zero or TDA.
        steps: optimisation steps per sample (TPT: 1).
        lr: AdamW learning rate (TPT: 5e-3).
        selection: fraction of confident views kept (TPT: 0.1).
        n_views: views per image including the original (TPT: 64).
        augment: "crop", "augmix" or "auto" (crops for >= 200 classes, else AugMix, as TPT).
        optimizer: "adamw" (TPT) or "sgd".
        seed, autocast: see `ViewAdapter`.
    """

    def __init__(self, learner, steps: int = 1, lr: float = 5e-3, selection: float = 0.1, n_views: int = 64,
                 augment: str = "auto", optimizer: str = "adamw", seed: int = 0, autocast: bool = True):
        if not isinstance(learner, PromptTuning):
            raise TypeError(f"TPT tunes a text prompt (`PromptTuning`), and {type(learner).__name__} has none. Use a "
                            f"CoOp-family learner (for zero-shot CLIP: CoOp(clip, classnames, ctx_init='a photo "
                            f"of a')), or an adapter that needs no text prompt: Zero or TDA.")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if steps < 0 or not 0 < selection <= 1:
            raise ValueError(f"need steps >= 0 and 0 < selection <= 1, got steps={steps}, selection={selection}")
        super().__init__(learner, n_views, augment, seed, autocast)
        self.steps, self.lr, self.selection, self.optimizer = steps, lr, selection, optimizer
        self._step0 = None  # (prompt state, shared context leaf, its text features with their graph)

    def extra_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        """Per-sample term [B] added to the entropy, from text features [B, C, D]; C-TPT overrides it."""
        return text_features.new_zeros(())

    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        if views.dim() != 5:
            raise ValueError(f"views must be [B, V, 3, H, W] (view 0 the original image), got {tuple(views.shape)}")
        if not self.learner.batched_tuning:
            return torch.cat([self._adapt_one(sample) for sample in views])
        return self.adapt_features(self.view_features(views))

    def adapt_features(self, features: torch.Tensor) -> torch.Tensor:
        """TPT on precomputed normalised view features [B, V, D] (view 0 the original) -> logits [B, C]."""
        learner = self.learner
        if not learner.batched_tuning:
            raise ValueError(f"{type(learner).__name__} is tuned in place, its views re-encoded at every step: "
                             f"pass the views to adapt_views, not their features")
        scale = learner.clip.logit_scale.float()
        with torch.no_grad():
            # A context shared by all images has one step-0 text pass; an image-conditioned one (CoCoOp)
            # is conditioned on the original view.
            shared = learner.tunable_context() is not None
            start = learner.tunable_context(features[:, 0])
        copies = start.detach().clone().requires_grad_(True)   # one independent prompt per sample
        loss_scale = self._loss_scale()
        optimizer = (torch.optim.AdamW([copies], lr=self.lr) if self.optimizer == "adamw"
                     else torch.optim.SGD([copies], lr=self.lr))
        chosen = None
        for step in range(self.steps):
            if step == 0 and shared:
                leaf, text0 = self._shared_text()
                text = text0.detach().expand(len(features), -1, -1).clone().requires_grad_(True)
            else:
                text = self._text(copies)
            if chosen is None:
                logits = scale * features @ text.transpose(-1, -2)                       # [B, V, C]
                selected = select_confident(logits.detach(), self.selection)
                chosen = gather_views(features, selected)                                # [B, K, D]
                logits = gather_views(logits, selected)
            else:
                logits = scale * chosen @ text.transpose(-1, -2)
            loss = (marginal_entropy(logits) + self.extra_loss(text)).sum() * loss_scale
            if step == 0 and shared:
                cotangents, = torch.autograd.grad(loss, text)                           # dL_b / dT, per sample
                grad, = torch.autograd.grad(text0, leaf, cotangents, retain_graph=True, is_grads_batched=True)
            else:
                grad, = torch.autograd.grad(loss, copies)
            copies.grad = _unscale(grad, loss_scale, per_sample=True)
            optimizer.step()
        with torch.no_grad():
            if self.steps == 0 and shared:
                text = self._shared_text()[1].detach().expand(len(features), -1, -1)
            else:
                text = self._text(copies)
            return scale * (features[:, :1] @ text.transpose(-1, -2)).squeeze(1)

    def _loss_scale(self) -> float:
        """Under fp16 autocast, gradients through the text encoder can underflow: scale the loss by TPT's
        GradScaler initial scale (1000) and unscale the gradient."""
        return 1000.0 if self.amp_dtype() is torch.float16 else 1.0

    def _text(self, copies: torch.Tensor) -> torch.Tensor:
        """Text features [B, C, D] (fp32) for B context copies: one text pass over B x C prompts."""
        with self.amp():
            return self.learner.context_text_features(copies).float()

    def _shared_text(self):
        """(shared context leaf, its text features [C, D] with graph): the step-0 pass shared by all samples,
        encoded once per state of the learner's prompts."""
        learner = self.learner
        key = (self.amp_dtype(), PromptState(learner))
        if self._step0 is None or self._step0[0] != key:
            leaf = learner.tunable_context().detach().requires_grad_(True)
            with torch.enable_grad(), self.amp():
                text = learner.context_text_features(leaf.unsqueeze(0))[0]
            self._step0 = (key, leaf, text.float())
        return self._step0[1:]

    def _adapt_one(self, views: torch.Tensor) -> torch.Tensor:
        """One sample's views [V, 3, H, W] through the learner's own forward, tuning its
        `tuning_parameter()` in place (restored afterwards, also on errors) with a fresh optimizer."""
        learner = self.learner
        tuned = learner.tuning_parameter()
        saved, saved_grad = tuned.detach().clone(), tuned.grad
        optimizer = (torch.optim.AdamW([tuned], lr=self.lr) if self.optimizer == "adamw"
                     else torch.optim.SGD([tuned], lr=self.lr))
        loss_scale = self._loss_scale()
        try:
            selected = None
            for _ in range(self.steps):
                with self.amp():
                    text = learner.text_features()
                    logits = learner(views if selected is None else views[selected], text_features=text)
                logits = logits.float().unsqueeze(0)
                if selected is None:
                    selected = select_confident(logits.detach(), self.selection)[0]
                    logits = logits[:, selected]
                loss = (marginal_entropy(logits) + self.extra_loss(text.float().unsqueeze(0))).sum() * loss_scale
                grad, = torch.autograd.grad(loss, tuned)   # other prompt tensors get no .grad
                tuned.grad = _unscale(grad, loss_scale, per_sample=False)
                optimizer.step()
            with torch.no_grad(), self.amp():
                return learner(views[:1]).float()
        finally:
            with torch.no_grad():
                tuned.copy_(saved)
            tuned.grad = saved_grad


@register_adapter("ctpt")
class CTPT(TPT):
    """C-TPT: TPT's loss minus `weight` x ATFD, the mean L2 distance of the normalised class text
    features to their centroid; keeping the class features spread out keeps the adapted prompt calibrated.

    Args:
        weight: the ATFD weight (the paper's lambda; was `lambda_`); None: 20 for label sets of >= 200 classes,
            50 otherwise. The authors' per-dataset values (ImageNet 50 with crops, its shifts 20 with AugMix):
            `create_adapter("ctpt", learner, dataset=...)`.
        augment: "augmix" (C-TPT's scripts use AugMix views except on ImageNet itself), "crop" or "auto".
        steps, lr, selection, n_views, optimizer, seed, autocast: as TPT.
    """

    @renamed(lambda_="weight")
    def __init__(self, learner, weight: float | None = None, steps: int = 1, lr: float = 5e-3,
                 selection: float = 0.1, n_views: int = 64, augment: str = "augmix", optimizer: str = "adamw",
                 seed: int = 0, autocast: bool = True):
        super().__init__(learner, steps, lr, selection, n_views, augment, optimizer, seed, autocast)
        self.weight = (20.0 if learner.n_classes >= 200 else 50.0) if weight is None else float(weight)

    def extra_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        centroid = text_features.mean(dim=-2, keepdim=True)
        atfd = (text_features - centroid).norm(dim=-1).mean(dim=-1)
        return -self.weight * atfd


def _unscale(grad: torch.Tensor, scale: float, per_sample: bool) -> torch.Tensor:
    """grad / scale, with an overflowed gradient (fp16) zeroed, per sample (dim 0) or whole, as GradScaler
    skips the step."""
    if scale == 1.0:
        return grad
    grad = grad / scale
    finite = grad.flatten(1).isfinite().all(1) if per_sample else grad.isfinite().all()
    return torch.where(finite.view(-1, *[1] * (grad.dim() - 1)) if per_sample else finite, grad, 0.0)

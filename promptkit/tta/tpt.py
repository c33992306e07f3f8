"""TPT (Shu et al., NeurIPS 2022) and C-TPT (Yoon et al., ICLR 2024), batched and exact."""
from __future__ import annotations

import torch

from ..learners.cocoop import CoCoOp
from ..learners.coop import CoOp, context_hook
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

    Learners whose image path carries prompts (`image_prompted`: MaPLe, IVLP, PromptSRC, CAVPT, ...)
    and learners with other text-side prompts than CoOp's context take a slower, equally exact path:
    one sample at a time through the learner's own forward, the views re-encoded at every step (only
    the selected ones after step 0), since their image features may depend on the tuned context.

    Args:
        learner: a learner with a text context `ctx` (CoOp family); for learners without one
            (zero-shot CLIP, VPT) use Zero or TDA.
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
        ctx = getattr(learner, "ctx", None)
        if not isinstance(ctx, torch.nn.Parameter) or not hasattr(learner, "ctx_pos"):
            raise TypeError(f"TPT tunes a text context (`ctx`), and {type(learner).__name__} has none. Use a "
                            f"CoOp-family learner (for zero-shot CLIP: CoOp(clip, classnames, ctx_init='a photo "
                            f"of a')), or an adapter that needs no text prompt: Zero or TDA.")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if steps < 0 or not 0 < selection <= 1:
            raise ValueError(f"need steps >= 0 and 0 < selection <= 1, got steps={steps}, selection={selection}")
        super().__init__(learner, n_views, augment, seed, autocast)
        self.steps, self.lr, self.selection, self.optimizer = steps, lr, selection, optimizer
        self._step0 = None  # (prompt state, context leaf, its text features with their graph)

    def extra_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        """Per-sample term [B] added to the entropy, from text features [B, C, D]; C-TPT overrides it."""
        return text_features.new_zeros(())

    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        if views.dim() != 5:
            raise ValueError(f"views must be [B, V, 3, H, W] (view 0 the original image), got {tuple(views.shape)}")
        learner = self.learner
        fast = not learner.image_prompted and (isinstance(learner, CoCoOp) or (
            type(learner).text_features is CoOp.text_features and type(learner).text_hooks is CoOp.text_hooks))
        if not fast:
            return torch.cat([self._adapt_one(sample) for sample in views])
        return self.adapt_features(self.view_features(views))

    def adapt_features(self, features: torch.Tensor) -> torch.Tensor:
        """TPT on precomputed normalised view features [B, V, D] (view 0 the original) -> logits [B, C]."""
        learner = self.learner
        scale = learner.clip.logit_scale.float()
        shared = not isinstance(learner, CoCoOp)
        with torch.no_grad():
            if shared:
                start = learner.ctx.expand(len(features), *learner.ctx.shape)
            else:  # TPT on CoCoOp: the context conditioned on the original image is what gets tuned
                start = learner.ctx + learner.meta_net(features[:, 0].to(learner.ctx.dtype)).unsqueeze(1)
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
        learner = self.learner
        b, n_classes = copies.shape[0], learner.n_classes
        rows = copies.repeat_interleave(n_classes, 0) if copies.dim() == 3 else copies.flatten(0, 1)
        hook = context_hook(learner.clip, rows, learner.ctx_pos.repeat(b, 1))
        with self.amp():
            text = learner.clip.encode_text(learner.tokens.repeat(b, 1), hooks=[hook])
        return text.float().view(b, n_classes, -1)

    def _shared_text(self):
        """(context leaf, its text features [C, D] with graph): the step-0 pass shared by all samples,
        encoded once per value of the learner's context."""
        learner = self.learner
        ctx = learner.ctx
        key = (self.amp_dtype(), PromptState(learner, [ctx, learner.tokens, learner.ctx_pos]))
        if self._step0 is None or self._step0[0] != key:
            leaf = ctx.detach().requires_grad_(True)
            with torch.enable_grad(), self.amp():
                text = learner.clip.encode_text(learner.tokens, hooks=[context_hook(learner.clip, leaf, learner.ctx_pos)])
            self._step0 = (key, leaf, text.float())
        return self._step0[1:]

    def _adapt_one(self, views: torch.Tensor) -> torch.Tensor:
        """One sample's views [V, 3, H, W] through the learner's own forward, tuning `learner.ctx` in
        place (restored afterwards, also on errors) with a fresh optimizer."""
        learner = self.learner
        ctx = learner.ctx
        saved, saved_grad = ctx.detach().clone(), ctx.grad
        optimizer = (torch.optim.AdamW([ctx], lr=self.lr) if self.optimizer == "adamw"
                     else torch.optim.SGD([ctx], lr=self.lr))
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
                grad, = torch.autograd.grad(loss, ctx)   # only ctx: other prompt tensors get no .grad
                ctx.grad = _unscale(grad, loss_scale, per_sample=False)
                optimizer.step()
            with torch.no_grad(), self.amp():
                return learner(views[:1]).float()
        finally:
            with torch.no_grad():
                ctx.copy_(saved)
            ctx.grad = saved_grad


@register_adapter("ctpt")
class CTPT(TPT):
    """C-TPT: TPT's loss minus `lambda_` x ATFD, the mean L2 distance of the normalised class text
    features to their centroid; keeping the class features spread out keeps the adapted prompt calibrated.

    Args:
        lambda_: ATFD weight; None picks the paper's value by the label set: 20 for ImageNet-scale
            natural shifts (>= 200 classes), 50 for fine-grained sets.
        augment: "augmix" (C-TPT's scripts use AugMix views for every dataset, ImageNet included),
            "crop" or "auto".
        **kwargs: as TPT.
    """

    def __init__(self, learner, lambda_: float | None = None, augment: str = "augmix", **kwargs):
        super().__init__(learner, augment=augment, **kwargs)
        self.lambda_ = (20.0 if learner.n_classes >= 200 else 50.0) if lambda_ is None else float(lambda_)

    def extra_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        centroid = text_features.mean(dim=-2, keepdim=True)
        atfd = (text_features - centroid).norm(dim=-1).mean(dim=-1)
        return -self.lambda_ * atfd


def _unscale(grad: torch.Tensor, scale: float, per_sample: bool) -> torch.Tensor:
    """grad / scale, with an overflowed gradient (fp16) zeroed, per sample (dim 0) or whole, as GradScaler
    skips the step."""
    if scale == 1.0:
        return grad
    grad = grad / scale
    finite = grad.flatten(1).isfinite().all(1) if per_sample else grad.isfinite().all()
    return torch.where(finite.view(-1, *[1] * (grad.dim() - 1)) if per_sample else finite, grad, 0.0)

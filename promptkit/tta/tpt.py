"""TPT (Shu et al., NeurIPS 2022) and C-TPT (Yoon et al., ICLR 2024), batched and exact."""
from __future__ import annotations

import torch

from ..learners.coop import context_hook
from ..registry import register_adapter
from .base import ViewAdapter, marginal_entropy, select_confident


@register_adapter("tpt")
class TPT(ViewAdapter):
    """Test-time prompt tuning: per test image, tune the learner's text context to minimise the
    entropy of the averaged prediction over its most confident augmented views.

    Exactly the published procedure: per step, logits of all views with the current prompt; the
    `int(V * selection)` lowest-entropy views are chosen at step 0 and kept; loss = entropy of the
    mean softmax (log space); AdamW (torch defaults) at `lr`; prompts and optimizer state reset per
    sample; the prediction is view 0's with the adapted prompt. Episodic: the learner is unchanged.

    What is not recomputed: the views' image features (encoded once when the learner's image path has
    no prompt), and the step-0 text features, which are the same for every sample: encoded once (until
    the learner's context changes) and differentiated for all B samples at once with a batched
    vector-Jacobian product. B samples are adapted together with independent context copies (AdamW is
    elementwise, so one AdamW over [B, ...] is B independent AdamWs).

    Args:
        learner: a learner with a text context `ctx` (CoOp family); for others use Zero or TDA.
        steps: optimisation steps per sample (TPT: 1).
        lr: AdamW learning rate (TPT: 5e-3).
        selection: fraction of confident views kept (TPT: 0.1).
        n_views: views per image including the original (TPT: 64).
        augment: "crop", "augmix" or "auto" (crops for >= 200 classes, else AugMix, as TPT).
        optimizer: "adamw" (TPT) or "sgd".
    """

    def __init__(self, learner, steps: int = 1, lr: float = 5e-3, selection: float = 0.1, n_views: int = 64,
                 augment: str = "auto", optimizer: str = "adamw", seed: int = 0):
        super().__init__(learner, n_views, augment, seed)
        ctx = getattr(learner, "ctx", None)
        if not isinstance(ctx, torch.nn.Parameter) or not hasattr(learner, "ctx_pos"):
            raise TypeError(f"TPT tunes a text context, and {type(learner).__name__} has none. Use a CoOp-family "
                            f"learner (e.g. CoOp(clip, classnames, ctx_init='a photo of a') for zero-shot CLIP), "
                            f"or a backward-free adapter: Zero or TDA.")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError("optimizer must be 'adamw' or 'sgd'")
        self.steps, self.lr, self.selection, self.optimizer = steps, lr, selection, optimizer
        self._step0 = None  # (context version, text features, graph inputs)

    def extra_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        """Per-sample term added to the entropy ([B] or scalar); C-TPT overrides it."""
        return torch.zeros((), device=text_features.device)

    def adapt_views(self, views: torch.Tensor) -> torch.Tensor:
        learner = self.learner
        if learner.image_prompted:
            return torch.cat([self._adapt_one(views[i:i + 1]) for i in range(len(views))])
        features = self.view_features(views)                                # [B, V, D], once
        b, n_classes = len(views), learner.n_classes
        ctx = learner.ctx.detach()
        copies = ctx.unsqueeze(0).repeat(b, *([1] * ctx.dim())).requires_grad_(True)  # independent prompts
        optimizer = (torch.optim.AdamW([copies], lr=self.lr) if self.optimizer == "adamw"
                     else torch.optim.SGD([copies], lr=self.lr))
        selected = None
        for step in range(self.steps):
            if step == 0:
                text, grad = self._step0_gradient(features, b)
                logits = learner.clip.logit_scale * features @ text.detach().transpose(-1, -2)
                selected = select_confident(logits.detach(), self.selection)
                copies.grad = grad(selected)
            else:
                text = self._text(copies)                                   # [B, C, D]
                logits = learner.clip.logit_scale * torch.gather(
                    features, 1, selected[..., None].expand(-1, -1, features.shape[-1])) @ text.transpose(-1, -2)
                loss = (marginal_entropy(logits) + self.extra_loss(text)).sum()
                optimizer.zero_grad()
                copies.grad, = torch.autograd.grad(loss, copies)
            optimizer.step()
        with torch.no_grad():
            text = self._text(copies) if self.steps else learner.text_features().expand(b, n_classes, -1)
            return learner.clip.logit_scale * (features[:, :1] @ text.transpose(-1, -2)).squeeze(1)

    def _text(self, copies: torch.Tensor) -> torch.Tensor:
        """Text features [B, C, D] for B context copies: one text pass over B*C rows."""
        learner = self.learner
        b, n_classes = copies.shape[0], learner.n_classes
        rows = copies.repeat_interleave(n_classes, 0) if copies.dim() == 3 else copies.flatten(0, 1)
        tokens = learner.tokens.repeat(b, 1)
        ctx_pos = learner.ctx_pos.repeat(b, 1)
        return learner.clip.encode_text(tokens, hooks=[context_hook(learner.clip, rows, ctx_pos)]).view(b, n_classes, -1)

    def _step0_gradient(self, features: torch.Tensor, b: int):
        """Step-0 text features (shared by all samples, encoded once per context) and a function giving
        each sample's gradient w.r.t. its context copy for a given view selection."""
        learner = self.learner
        version = (learner.ctx._version, learner.ctx.data_ptr())
        if self._step0 is None or self._step0[0] != version:
            with torch.enable_grad():
                ctx = learner.ctx.detach().requires_grad_(True)
                text = learner.clip.encode_text(learner.tokens, hooks=[context_hook(learner.clip, ctx, learner.ctx_pos)]
                                               )
            self._step0 = (version, text, ctx)
        _, text, ctx = self._step0

        def grad(selected: torch.Tensor) -> torch.Tensor:
            shared = text.detach().unsqueeze(0).repeat(b, 1, 1).requires_grad_(True)  # dL_b/dT per sample
            chosen = torch.gather(features, 1, selected[..., None].expand(-1, -1, features.shape[-1]))
            logits = learner.clip.logit_scale * chosen @ shared.transpose(-1, -2)
            loss = (marginal_entropy(logits) + self.extra_loss(shared)).sum()
            cotangents, = torch.autograd.grad(loss, shared)
            per_sample, = torch.autograd.grad(text, ctx, cotangents, retain_graph=True, is_grads_batched=True)
            return per_sample

        return text, grad

    def _adapt_one(self, views: torch.Tensor) -> torch.Tensor:
        """Image-prompted learners: one sample at a time, views re-encoded with the current prompt each step."""
        learner = self.learner
        saved = learner.ctx.detach().clone()
        optimizer = (torch.optim.AdamW([learner.ctx], lr=self.lr) if self.optimizer == "adamw"
                     else torch.optim.SGD([learner.ctx], lr=self.lr))
        try:
            selected = None
            for _ in range(self.steps):
                text = learner.text_features()
                logits = learner(views[0], text_features=text).unsqueeze(0)
                if selected is None:
                    selected = select_confident(logits.detach(), self.selection)
                loss = (marginal_entropy(logits[:, selected[0]]) + self.extra_loss(text.unsqueeze(0))).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                return learner(views[0, :1])
        finally:
            with torch.no_grad():
                learner.ctx.copy_(saved)
            learner.ctx.grad = None


@register_adapter("ctpt")
class CTPT(TPT):
    """C-TPT: TPT's loss minus `lambda_` x ATFD, the average distance of the (normalised) class text
    features to their centroid; spreading them out calibrates the adapted prompt.

    Args:
        lambda_: ATFD weight (paper: 50 for fine-grained sets, 20 for natural distribution shifts).
        **kwargs: as TPT.
    """

    def __init__(self, learner, lambda_: float = 50.0, **kwargs):
        super().__init__(learner, **kwargs)
        self.lambda_ = lambda_

    def extra_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        centroid = text_features.mean(dim=-2, keepdim=True)
        atfd = (text_features - centroid).norm(dim=-1).mean(dim=-1)
        return -self.lambda_ * atfd

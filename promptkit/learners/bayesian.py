"""Bayesian Prompt Learning for Image-Language Model Generalization (Derakhshani et al., ICCV 2023)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..objectives import TrainOutputs
from ..registry import register_method
from .cocoop import CoCoOp


class InferenceBlock(nn.Sequential):
    """The authors' posterior network: Linear -> ELU -> Linear -> ELU -> Linear."""

    def __init__(self, inputs: int, hidden: int, outputs: int):
        super().__init__(nn.Linear(inputs, hidden), nn.ELU(inplace=True), nn.Linear(hidden, hidden),
                         nn.ELU(inplace=True), nn.Linear(hidden, outputs))


class Posterior(nn.Module):
    """Image feature -> (mean, log-variance) of the context shift, two separate `InferenceBlock`s."""

    def __init__(self, inputs: int, hidden: int, outputs: int):
        super().__init__()
        self.mean = InferenceBlock(inputs, hidden, outputs)
        self.log_variance = InferenceBlock(inputs, hidden, outputs)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(features), self.log_variance(features)


class GlobalPosterior(nn.Module):
    """The authors' unconditional posterior (`coopvpt`): one learned mean (zeros) and log-variance (uniform in
    [0, 1), the parameter their code names `std_posterior` and uses as a log-variance) for every image."""

    def __init__(self, outputs: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(outputs))
        self.log_variance = nn.Parameter(torch.rand(outputs))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(features), len(self.mean))
        return self.mean.expand(shape), self.log_variance.expand(shape)


@register_method("bayesian")
class BayesianPrompt(CoCoOp):
    """CoCoOp's context as a distribution: for image x the shift of every context token is
    r ~ N(mu(x), diag(sigma(x)^2)), mu and log sigma^2 from two 3-layer ELU networks (width D/2) of the image
    feature (the authors' `cocoopvpt` posterior), reparameterised r = mu + eps * sigma. The class probabilities
    are averaged over `n_samples` draws (the authors' L), at training (the loss is -log of the averaged
    probability of the label: `ce` on these logits) and at inference. The `bayesian-kl` objective adds
    0.001 x KL(N(mu, sigma^2) || N(0, I)), averaged over the context width, as the authors' code weighs it.

    Logits are the log of the averaged probabilities (log-mean-exp of the samples' log-softmax), so softmax
    gives the Monte Carlo predictive and cross-entropy on them is the authors' training loss.

    Reproducibility: prediction (`forward`) draws its noise table eps [n_samples, W] from `mc_seed` on every
    call, shared by all images, so the same model gives the same predictions whatever the batching and the
    global random state; training (`training_outputs`) draws fresh noise per image (per batch for the
    unconditional posterior) from the global generator (the trainer seeds it per epoch). Where the authors' code breaks the batch dimension (it only runs with
    batch 1), the shift here is per image, as its batch-1 runs compute it.

    Defaults are the paper's (`vit_b16_c4_ep10_batch1_ctxv1`): 4 context tokens from "a photo of a", L = 10
    (the ImageNet and config default; the recipes set the per-dataset L of the authors' scripts), and the
    image-conditional posterior the paper describes. The config the authors ship runs the unconditional one
    (`VPT_TYPE: coopvpt`, `conditional=False` here), so the recipes set that.

    Args:
        n_ctx, ctx_init, init_std: as CoOp.
        text_batch: prompt sets (C prompts each: one image's Monte Carlo sample) encoded together.
        checkpoint_text: as CoCoOp; the noise is drawn before the text pass, so the recomputation sees the same.
        n_samples: Monte Carlo samples L per image, at training and inference.
        mc_seed: seed of the noise table used for prediction.
        conditional: mean and variance from the image feature (the paper); False: learned, the same for every
            image (`GlobalPosterior`).
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = None,
                 ctx_init: str | None = "a photo of a", init_std: float = 0.02, text_batch: int = 8,
                 n_samples: int = 10, mc_seed: int = 0, conditional: bool = True, checkpoint_text: bool | str = "auto"):
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples (Monte Carlo samples of the context) must be an integer >= 1, got "
                             f"{n_samples!r}; the authors use 5-40 (10 by default)")
        super().__init__(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std, text_batch=text_batch,
                         checkpoint_text=checkpoint_text)
        # The posterior replaces CoCoOp's Meta-Net under the same name, as the authors' code names it.
        self.meta_net = (Posterior(clip.embed_dim, clip.embed_dim // 2, clip.text_width) if conditional
                         else GlobalPosterior(clip.text_width)).to(self.ctx.device)
        self.n_samples, self.mc_seed = n_samples, mc_seed
        self.set_objectives(["ce", "bayesian-kl"])

    def tunable_context(self, image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        """The posterior mean of the context, context + mu(image feature) [B, n_ctx, W] (TPT's tuned context,
        and with a zero feature the class-level `text_features`)."""
        if image_features is None:
            return None
        return self.ctx + self.meta_net(image_features.to(self.ctx.dtype))[0].unsqueeze(1)

    def prediction_noise(self) -> torch.Tensor:
        """eps [n_samples, W] drawn from `mc_seed`: the same table on every call."""
        generator = torch.Generator().manual_seed(self.mc_seed)
        return torch.randn(self.n_samples, self.clip.text_width, generator=generator).to(self.ctx.device)

    def sampled_logits(self, image_features: torch.Tensor, noise: torch.Tensor | None = None):
        """Log of the averaged class probabilities [B, C], and the posterior (mean, log-variance) [B, W] ([1, W]
        for the unconditional posterior).

        The conditional posterior runs n_samples x C prompts per image. The unconditional one draws one shift
        per sample for the whole batch (the authors' `coopvpt` samples [L, 1, W]), so its n_samples x C prompts
        are encoded once per batch. The L x B contexts are encoded `text_batch` at a time (`prompt_set_features`,
        checkpointed: memory does not grow with the batch or L). Fresh eps are drawn for the whole batch at once,
        so the noise an image gets does not depend on `text_batch`.

        Args:
            image_features: normalised [B, D].
            noise: eps [n_samples, W] shared by the images, or None for fresh eps.
        """
        shared = isinstance(self.meta_net, GlobalPosterior)
        mean, log_var = self.meta_net(image_features[:1] if shared else image_features.to(self.ctx.dtype))
        eps = torch.randn(self.n_samples, *mean.shape, device=mean.device, dtype=mean.dtype) if noise is None \
            else noise[:, None].to(mean.dtype)
        shift = mean + eps * torch.exp(0.5 * log_var)  # [L, B, W] (B = 1 when shared)
        contexts = self.ctx + shift.unsqueeze(2)  # [L, B, n_ctx, W]
        text = self.prompt_set_features(contexts.flatten(0, 1)).unflatten(0, contexts.shape[:2])
        text = text.expand(-1, len(image_features), -1, -1)
        with torch.autocast(image_features.device.type, enabled=False):  # fp32 logits, as `PromptLearner.logits`
            per_sample = self.clip.logit_scale.float() * torch.einsum("bd,lbcd->lbc", image_features.float(),
                                                                      text.float())
            logits = per_sample.log_softmax(-1).logsumexp(0) - math.log(self.n_samples)
        return logits, (mean, log_var)

    def forward(self, images=None, *, image_features=None, text_features=None) -> torch.Tensor:
        """Log Monte Carlo predictive [B, C] with the seeded noise table (`text_features` is not used)."""
        if image_features is None:
            image_features = self.encode_image(images)
        return self.sampled_logits(image_features, self.prediction_noise())[0]

    def training_outputs(self, images=None, *, image_features=None) -> TrainOutputs:
        if image_features is None:
            image_features = self.encode_image(images)
        logits, posterior = self.sampled_logits(image_features)
        return TrainOutputs(self, logits, image_features, None, images, extras={"posterior": posterior})

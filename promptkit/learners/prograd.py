"""ProGrad: prompt-aligned gradient (Zhu et al., ICCV 2023)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..registry import register_method
from .base import LossOutput
from .coop import CoOp


@register_method("prograd")
class ProGrad(CoOp):
    """CoOp trained only along directions that do not contradict zero-shot CLIP: per prompt tensor,
    when the cross-entropy gradient g conflicts with the gradient k of KL(zero-shot || learned)
    (g . k < 0), the update uses g - `lambda_` (g . k / |k|^2) k, else g.

    `training_loss` returns a surrogate, sum(p * projected_g), whose gradient is exactly the projected
    gradient, so the shared trainer stays method-agnostic; the logged `ce` is the real loss.

    Defaults are the paper's: lambda 1.0, temperature 1, 16 context tokens, the dataset's hand-crafted
    template for the zero-shot model.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str | None = None,
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 lambda_: float = 1.0, temperature: float = 1.0, templates: Sequence[str] = ("a photo of a {}.",)):
        super().__init__(clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std)
        self.lambda_, self.temperature = lambda_, temperature
        self.register_buffer("zero_shot_text", clip.zero_shot_text_features(self.classnames, list(templates)),
                             persistent=False)

    def training_loss(self, labels, images=None, *, image_features=None) -> LossOutput:
        if image_features is None:
            image_features = self.encode_image(images)
        logits = self(image_features=image_features)
        with torch.no_grad():
            zero_shot = self.logits(image_features, self.zero_shot_text)
        t = self.temperature
        ce = F.cross_entropy(logits.float(), labels)
        kl = F.kl_div((logits.float() / t).log_softmax(-1), (zero_shot.float() / t).softmax(-1),
                      reduction="batchmean") * t * t
        params = self.prompt_parameters()
        g_ce = torch.autograd.grad(ce, params, retain_graph=True)
        g_kl = torch.autograd.grad(kl, params)
        surrogate = logits.new_zeros(())
        for p, g, k in zip(params, g_ce, g_kl):
            dot = (g * k).sum()
            if dot < 0:
                g = g - self.lambda_ * dot / k.pow(2).sum().clamp_min(1e-12) * k
            surrogate = surrogate + (p * g.detach()).sum()
        return LossOutput(surrogate, logits.detach(), {"ce": ce.detach(), "kl": kl.detach()})

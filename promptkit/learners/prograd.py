"""ProGrad: prompt-aligned gradient (Zhu et al., ICCV 2023)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..registry import register_method
from ..templates import dataset_template
from .base import LossOutput
from .coop import CoOp


@register_method("prograd")
class ProGrad(CoOp):
    """CoOp trained only along directions that do not contradict zero-shot CLIP: per prompt tensor,
    when the cross-entropy gradient g conflicts with the gradient k of KL(zero-shot || learned)
    (g . k < 0), the update uses g - `lambda_` (g . k / |k|^2) k, else g.

    The rule is not linear in the batch, so both gradients are taken over the whole batch (the trainer
    accumulates and all-reduces each, see `LossOutput.gradient_terms`) and projected once per step, as
    the official code does on its single batch.

    Defaults are the official code's: lambda 1.0, temperature 1, 16 context tokens initialised as zero
    vectors followed by the words of ProGrad's hand-crafted template before the class name ("a photo of a"
    -> 12 zeros + 4 words), that template (ProGrad's per-dataset table, `dataset`) for the zero-shot model.

    Args:
        ctx_init: "template" (the template's words before the class name), other words, or None (random).
        dataset: a dataset name (e.g. "oxford_pets") selecting ProGrad's template; None: "a photo of a {}.".
        templates: explicit templates for the zero-shot model (overrides `dataset`).
        lambda_, temperature: projection strength and KL temperature.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = 16, ctx_init: str | None = "template",
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 lambda_: float = 1.0, temperature: float = 1.0, dataset: str | None = None,
                 templates: Sequence[str] | None = None):
        template = dataset_template(dataset, "prograd")
        if ctx_init == "template":
            # The official code uses the template's words as ctx_init: it needs the class name last.
            ctx_init = template.split("{}")[0].strip() or None
        super().__init__(clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std)
        self.lambda_, self.temperature = lambda_, temperature
        self.register_buffer("zero_shot_text", clip.zero_shot_text_features(self.classnames, templates or [template]),
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
        return LossOutput(ce, logits, {"ce": ce.detach(), "kl": kl.detach()}, gradient_terms={"ce": ce, "kl": kl})

    def combine_gradients(self, grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        out = []
        for g, k in zip(grads["ce"], grads["kl"]):
            dot = (g * k).sum()
            if dot < 0:
                g = g - self.lambda_ * dot / k.pow(2).sum().clamp_min(1e-12) * k
            out.append(g)
        return out

"""Feature-level learners on frozen CLIP image features: CLIP-Adapter (Gao et al., IJCV 2023), Tip-Adapter and
Tip-Adapter-F (Zhang et al., ECCV 2022), and CLIP's linear probe (Radford et al., 2021, appendix A.3).

None of them prompts the image encoder, so the trainer caches `encode_image` and they act after it, in `logits`.
Those built from data define `fit(features, labels, val_features, val_labels)`, which `PromptTrainer.fit` calls
with the training set's cached features before any epoch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_method
from .zeroshot import ZeroShotCLIP


def _fp32(device_type: str):
    # Cache affinities and heads in fp32, as the base logits: under fp16 autocast exp(-beta (1 - cos)) is coarse.
    return torch.autocast(device_type, enabled=False)


@register_method("clip-adapter")
class CLIPAdapter(ZeroShotCLIP):
    """A residual bottleneck MLP on the image features, text side CLIP's hand-crafted prompt.

    As the official code: `f' = ratio * MLP(f) + (1 - ratio) * f`, normalised, with MLP = Linear(D, D/reduction)
    - ReLU - Linear(D/reduction, D) - ReLU, no biases. The official adapter reads the unnormalised features; the
    MLP is positively homogeneous (no bias, ReLU), so on the cached normalised features the logits are the same.

    Args:
        clip: the frozen model.
        classnames: class names in label order.
        reduction: bottleneck factor (the paper's 4).
        ratio: residual ratio, the weight of the adapted features (the paper's 0.2).
        templates: hand-crafted templates of the text side (see `ZeroShotCLIP`).
        dataset: selects CoOp's per-dataset template, which CLIP-Adapter's code also uses.
    """

    def __init__(self, clip, classnames: Sequence[str], reduction: int = 4, ratio: float = 0.2,
                 templates: Sequence[str] | None = None, dataset: str | None = None):
        super().__init__(clip, classnames, templates, dataset)
        dim, hidden = clip.embed_dim, clip.embed_dim // reduction
        self.ratio = ratio
        self.adapter = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, dim, bias=False), nn.ReLU()).to(self._text_features.device)

    def adapt(self, image_features: torch.Tensor) -> torch.Tensor:
        """Adapted, normalised image features [B, D]."""
        mixed = self.ratio * self.adapter(image_features) + (1 - self.ratio) * image_features
        return F.normalize(mixed, dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return super().logits(self.adapt(image_features), text_features)


@register_method("tip-adapter")
class TipAdapter(ZeroShotCLIP):
    """Training-free cache model: logits = zero-shot + alpha * exp(-beta (1 - f . k)) @ one-hot labels.

    The cache (keys = normalised few-shot image features, values = their one-hot labels) is built by `fit`;
    until then it is empty and the learner is zero-shot. The official code scales the zero-shot logits by 100,
    OpenAI CLIP's logit scale; here the model's own scale is used. Keys are the trainer's image features averaged
    over its cache passes (the official cache averages 10 augmented passes), renormalised.

    Args:
        clip: the frozen model.
        classnames: class names in label order.
        alpha: weight of the cache logits until a search sets it (the official ImageNet `init_alpha`).
        beta: sharpness of the affinity until a search sets it (the official `init_beta`).
        search_scale: upper ends of the beta and alpha grids (the official ImageNet config; other datasets use
            e.g. (12, 5) for Caltech101).
        search_steps: number of beta and alpha values, each grid starting at 0.1 (the official 200 x 20).
        templates: hand-crafted templates of the text side (see `ZeroShotCLIP`).
        dataset: selects CoOp's per-dataset template.
    """

    learn_keys = False

    def __init__(self, clip, classnames: Sequence[str], alpha: float = 1.17, beta: float = 1.0,
                 search_scale: Sequence[float] = (7.0, 3.0), search_steps: Sequence[int] = (200, 20),
                 templates: Sequence[str] | None = None, dataset: str | None = None):
        super().__init__(clip, classnames, templates, dataset)
        self.search_scale, self.search_steps = tuple(search_scale), tuple(search_steps)
        device = self._text_features.device
        # Buffers, so that the values a search chose are saved with the cache.
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        self.register_buffer("beta", torch.tensor(float(beta), device=device))
        self._set_cache(torch.zeros(0, clip.embed_dim), torch.zeros(0, self.n_classes))

    def _set_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        device = self._text_features.device
        for name in ("cache_keys", "cache_values"):
            if hasattr(self, name):
                delattr(self, name)
        if self.learn_keys:
            self.cache_keys = nn.Parameter(keys.float().to(device))
        else:
            self.register_buffer("cache_keys", keys.float().to(device))
        self.register_buffer("cache_values", values.float().to(device))

    def fit(self, features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor | None = None,
            val_labels: torch.Tensor | None = None) -> None:
        """Builds the cache from the few-shot image features [N, D] and labels [N]; with validation features,
        searches alpha and beta on them (`search`)."""
        self._set_cache(F.normalize(features.float(), dim=-1), F.one_hot(labels.long(), self.n_classes))
        if val_features is not None:
            self.search(val_features, val_labels)

    def cache_logits(self, image_features: torch.Tensor, beta: torch.Tensor | float | None = None) -> torch.Tensor:
        """exp(-beta (1 - f . k)) @ values [B, C] (beta: the learner's by default)."""
        beta = self.beta if beta is None else beta
        affinity = image_features.float() @ self.cache_keys.float().t()
        return torch.exp(-beta * (1 - affinity)) @ self.cache_values

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        with _fp32(image_features.device.type):
            return super().logits(image_features, text_features) + self.alpha * self.cache_logits(image_features)

    @torch.no_grad()
    def search(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """The official grid search on validation features: beta_i = 0.1 + i (scale_b - 0.1) / steps_b, alpha
        likewise, the first best accuracy in the official loop order (beta outer) wins. Sets and returns
        (alpha, beta)."""
        (scale_b, scale_a), (steps_b, steps_a) = self.search_scale, self.search_steps
        betas = [i * (scale_b - 0.1) / steps_b + 0.1 for i in range(steps_b)]
        device = self._text_features.device  # the features may come from anywhere, e.g. a CPU cache
        features, labels = features.float().to(device), labels.to(device)
        alphas = torch.tensor([i * (scale_a - 0.1) / steps_a + 0.1 for i in range(steps_a)], device=device)
        with _fp32(features.device.type):
            zero_shot = super().logits(features, self.text_features())
            accuracy = torch.stack([
                (zero_shot + alphas[:, None, None] * self.cache_logits(features, beta)).argmax(-1).eq(labels)
                .float().mean(-1) for beta in betas])  # [steps_b, steps_a]
        best = int(accuracy.flatten().argmax())  # the first maximum: the official loop's strict '>'
        alpha, beta = float(alphas[best % steps_a]), betas[best // steps_a]
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        return alpha, beta

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        keys = state.get("cache_keys")
        if keys is not None and keys.shape != self.cache_keys.shape:  # the cache takes the saved size
            self._set_cache(keys, state["cache_values"])
        super().load_prompt_state_dict(state, strict)


@register_method("tip-adapter-f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter with the cache keys fine-tuned by the trainer (CE on the cache model's logits at the initial
    alpha and beta, the official recipe: AdamW, lr 0.001, 20 epochs); alpha and beta are searched on the
    validation features after the last epoch, as the official code searches after fine-tuning. Keywords: those
    of `TipAdapter`."""

    learn_keys = True

    def fit(self, features, labels, val_features=None, val_labels=None) -> None:
        """Builds the cache; the validation features are kept for the search after the last epoch."""
        super().fit(features, labels)
        self._validation = None if val_features is None else (val_features, val_labels)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        super().on_epoch_end(epoch, epochs)
        if epoch == epochs and getattr(self, "_validation", None) is not None:
            self.search(*self._validation)
            self._validation = None


def _logistic(C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    # lbfgs with more than two classes is multinomial (the only choice in current scikit-learn).
    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)


def search_C(x, y, val_x, val_y, max_iter: int = 1000) -> float:
    """CLIP's search of the inverse regularisation C on validation accuracy: the coarse grid 1e-6, 1e-4, ...,
    1e6, then the interval around the peak halved until 8 steps per decade. Ties keep the current peak (the
    coarse grid: the smaller C)."""
    scores: dict[float, float] = {}

    def accuracy(log_c: float) -> float:
        if log_c not in scores:
            scores[log_c] = _logistic(10.0 ** log_c, max_iter).fit(x, y).score(val_x, val_y)
        return scores[log_c]

    best, step = max(range(-6, 7, 2), key=accuracy), 2.0
    while step > 1 / 8:
        step /= 2  # powers of two: the grid points are exact
        best = max((best, best - step, best + step), key=accuracy)
    return 10.0 ** best


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int, C: float | None = None,
                     max_iter: int = 1000, val_features: torch.Tensor | None = None,
                     val_labels: torch.Tensor | None = None, method: str = "linear-probe"
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CLIP's linear probe on image features [N, D] (normalised here) and labels [N]: C searched on the validation
    features (`search_C`) unless given. Returns (weight [C, D], bias [C], C) with `logits = f @ weight.T + bias`.

    Raises:
        ValueError: no validation features while `C` is None, or a class without training images.
    """
    x, y = F.normalize(features.float(), dim=-1).cpu().numpy(), labels.cpu().numpy()
    missing = sorted(set(range(n_classes)) - set(y.tolist()))
    if missing:
        raise ValueError(f"{method} needs training images of every class; none of classes {missing[:5]}")
    if C is None:
        if val_features is None:
            raise ValueError(f"{method} searches C on validation features: pass a validation set "
                             f"(PromptTrainer.fit(train, val)) or give C")
        C = search_C(x, y, F.normalize(val_features.float(), dim=-1).cpu().numpy(), val_labels.cpu().numpy(),
                     max_iter)
    model = _logistic(C, max_iter).fit(x, y)
    weight, bias = torch.as_tensor(model.coef_).float(), torch.as_tensor(model.intercept_).float()
    if n_classes == 2:  # scikit-learn's one binary logit w.f + b is the softmax of (-(w.f + b), w.f + b) / 2
        weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
    return weight, bias, C


@register_method("linear-probe")
class LinearProbe(ZeroShotCLIP):
    """CLIP's linear probe: L2-regularised multinomial logistic regression (scikit-learn, lbfgs) on the frozen,
    normalised image features, stored as a linear head (`weight` [C, D], `bias` [C]); logits = f @ W.T + b.

    `fit` searches C on the validation features (`search_C`) unless `C` is given, and keeps the chosen value in
    `chosen_C` (saved). Until fitted, the head is the zero-shot classifier (logit scale x text features, no
    bias); the text side (templates, dataset) serves only that and `text_features`.

    Args:
        clip: the frozen model.
        classnames: class names in label order.
        C: inverse regularisation strength; None: searched on validation.
        max_iter: lbfgs iterations (CLIP's 1000).
        templates: hand-crafted templates of the zero-shot initial head.
        dataset: selects CoOp's per-dataset template.
    """

    def __init__(self, clip, classnames: Sequence[str], C: float | None = None, max_iter: int = 1000,
                 templates: Sequence[str] | None = None, dataset: str | None = None):
        super().__init__(clip, classnames, templates, dataset)
        self.fixed_C, self.max_iter = C, max_iter
        text = self._text_features
        self.register_buffer("weight", clip.logit_scale.detach().float().to(text.device) * text.float())
        self.register_buffer("bias", torch.zeros(self.n_classes, device=text.device))
        self.register_buffer("chosen_C", torch.tensor(float("nan"), dtype=torch.float64, device=text.device))

    def fit(self, features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor | None = None,
            val_labels: torch.Tensor | None = None) -> None:
        """Fits the head on image features [N, D] (normalised here) and labels [N].

        Raises:
            ValueError: no validation features while `C` is None, or a class without training images.
        """
        weight, bias, C = fit_linear_probe(features, labels, self.n_classes, self.fixed_C, self.max_iter,
                                           val_features, val_labels)
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        self.chosen_C.fill_(C)

    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.bias

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        with _fp32(image_features.device.type):
            return image_features.float() @ self.weight.t() + self.bias


@register_method("contrastive-adapter")
class ContrastiveAdapter(ZeroShotCLIP):
    """Contrastive adapter (Zhang & Ré, "Contrastive Adapters for Foundation Model Group Robustness", NeurIPS 2022):
    an MLP on the frozen image embeddings, trained with the `contrastive-adapter` objective so that embeddings of a
    class that zero-shot CLIP separates (its groups) move together; logits = logit scale x normalised adapted
    features @ class text features.

    As the authors' code (network/adapter.py, the sample commands of its README): Linear(D, hidden) - BatchNorm1d
    - ReLU - Linear(hidden, D), the first Linear without bias when batch-normalised, no residual connection by
    default. Their classifier multiplies by 100 (OpenAI CLIP's logit scale); here the model's own scale. `fit`
    (called by `PromptTrainer.fit` with the training set's features) keeps the features, labels and zero-shot
    correctness the objective samples its anchors, positives and hard negatives from; the bank is not saved.

    Args:
        clip: the frozen model.
        classnames: class names in label order.
        hidden_dim: width of the MLP (the authors' 128).
        batch_norm: BatchNorm1d after the first Linear (the authors' sample commands: on).
        residual: add the input to the MLP's output (the authors' `--residual_connection`, off in their commands).
        temperature, n_positives, n_negatives, n_neighbours, text: the loss (see
            `promptkit.objectives.robust.ContrastiveAdapterLoss`).
        templates: hand-crafted templates of the class text embeddings.
        dataset: selects CoOp's per-dataset template.
    """

    def __init__(self, clip, classnames: Sequence[str], hidden_dim: int = 128, batch_norm: bool = True,
                 residual: bool = False, temperature: float = 0.1, n_positives: int = 2048, n_negatives: int = 2048,
                 n_neighbours: int = 4096, text: bool = True, templates: Sequence[str] | None = None,
                 dataset: str | None = None):
        super().__init__(clip, classnames, templates, dataset)
        dim, device = clip.embed_dim, self._text_features.device
        self.residual = residual
        self.adapter = nn.Sequential(nn.Linear(dim, hidden_dim, bias=not batch_norm),
                                     nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity(), nn.ReLU(),
                                     nn.Linear(hidden_dim, dim)).to(device)
        self.set_objectives([("contrastive-adapter", dict(temperature=temperature, n_positives=n_positives,
                                                          n_negatives=n_negatives, n_neighbours=n_neighbours, text=text))])
        self.fit(torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device))

    def embed(self, image_features: torch.Tensor, batch_statistics: bool = False) -> torch.Tensor:
        """Adapted embeddings [B, D] (not normalised), in fp32. The batch norm normalises with the batch's statistics
        (and updates its running ones) only for `batch_statistics=True` in training mode: the objective's pass.
        Logits always use the running statistics, so a prediction never depends on the rest of its batch and
        inference changes no buffer; the authors' classifier output is unused during contrastive epochs and
        evaluated in eval mode."""
        first, norm, _, last = self.adapter
        with _fp32(image_features.device.type):
            x = image_features.float()
            hidden = first(x)
            if isinstance(norm, nn.BatchNorm1d) and not (batch_statistics and self.training):
                hidden = F.batch_norm(hidden, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                      training=False, eps=norm.eps)
            else:
                hidden = norm(hidden)
            out = last(F.relu(hidden))
            return out + x if self.residual else out

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return super().logits(F.normalize(self.embed(image_features), dim=-1), text_features)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor | None = None,
            val_labels: torch.Tensor | None = None) -> None:
        """Keeps the training set's frozen features [N, D] (normalised), labels [N] and whether zero-shot CLIP
        classifies each correctly: the pool of the objective's positives and hard negatives."""
        features = F.normalize(features.float().to(self._text_features.device), dim=-1)
        labels = labels.long().to(features.device)
        correct = (features @ self._text_features.float().t()).argmax(-1).eq(labels)
        for name, value in (("bank_features", features), ("bank_labels", labels), ("bank_correct", correct)):
            self.register_buffer(name, value.to(self._text_features.device), persistent=False)

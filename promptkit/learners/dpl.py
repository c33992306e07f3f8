"""DPL: Domain Prompt Learning for Efficiently Adapting CLIP to Unseen Domains (Zhang et al., 2021/2023)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..objectives import TrainOutputs
from ..registry import register_method
from .base import PromptLearner
from .coop import build_prompts, context_hook


class PromptGenerator(nn.Module):
    """DomainBed's MLP, as DPL uses it: Linear -> Dropout -> ReLU, (`depth` - 2) x (Linear -> Dropout -> ReLU),
    Linear; weights Xavier-uniform, biases 0.01 (the authors' `init_weights`)."""

    def __init__(self, inputs: int, outputs: int, width: int = 512, depth: int = 3, dropout: float = 0.1):
        super().__init__()
        if depth < 2:
            raise ValueError(f"the prompt generator needs depth >= 2 (input and output layers), got {depth}")
        self.input = nn.Linear(inputs, width)
        self.hiddens = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.output = nn.Linear(width, outputs)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.input, *self.hiddens, self.output):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.input, *self.hiddens):
            x = torch.relu(self.dropout(layer(x)))
        return self.output(x)


@register_method("dpl")
class DPL(PromptLearner):
    """The context tokens are generated from the domain: a prompt generator (a 3-layer MLP) maps each image
    feature of a batch to n_ctx x W numbers; their mean over the batch is the batch's context, "[ctx] [CLASS]."
    for every class, and the batch's images are scored against it. Trained on source domains, it adapts the
    prompt to each test batch with no gradient step: the batch is the domain's sample (the authors evaluate
    with one domain per batch). Only the generator learns; there is no static context (the authors' code).

    `text_features()` is the prompt generated from a zero feature (the generator's biases): a batch-free
    summary; predictions always use the batch's own prompt, so they depend on the other images of the batch
    (`batch_dependent`: test-time adapters, which answer image by image, refuse it).

    Defaults are the authors' (shogi880/DPLCLIP `hparams_registry.py`): 16 domain tokens, MLP width 512,
    depth 3, dropout 0.1; SGD lr 1e-3, momentum 0.1, batch 32 per source domain, 5001 steps.

    Differences from the authors' code: the generator reads CLIP's normalised image features (the authors
    feed the raw ones; the trainer caches normalised features); DomainBed draws one batch per source domain
    and gives each its own prompt, while the trainer's batches mix the domains of the training set, so the
    batch's prompt is conditioned on that mix (train on one source domain per dataset, or accept mixed
    batches, as the demo does with one source domain).

    Args:
        n_ctx: number of generated context (domain) tokens.
        width, depth, dropout: the generator MLP's.
    """

    batch_dependent = True

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int = 16, width: int = 512, depth: int = 3,
                 dropout: float = 0.1):
        super().__init__(clip, classnames)
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        self.n_ctx = n_ctx
        device = clip.model.token_embedding.weight.device
        self.generator = PromptGenerator(clip.embed_dim, n_ctx * clip.text_width, width, depth, dropout).to(device)
        tokens, ctx_pos = build_prompts(clip, self.classnames, n_ctx)
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("ctx_pos", ctx_pos.to(device), persistent=False)

    def domain_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """The batch's context [n_ctx, W]: the generator's output averaged over the batch's images."""
        generated = self.generator(image_features.to(self.generator.input.weight.dtype))
        return generated.mean(0).view(self.n_ctx, self.clip.text_width)

    def domain_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Class text features [C, D] under the batch's generated prompt."""
        return self.clip.encode_text(self.tokens, hooks=[context_hook(self.clip, self.domain_context(image_features),
                                                                      self.ctx_pos)])

    def text_features(self) -> torch.Tensor:
        return self.domain_text_features(torch.zeros(1, self.clip.embed_dim, device=self.tokens.device))

    def forward(self, images=None, *, image_features=None, text_features=None) -> torch.Tensor:
        """Logits [B, C] against the batch's own prompt (`text_features` is not used)."""
        if image_features is None:
            image_features = self.encode_image(images)
        return self.logits(image_features, self.domain_text_features(image_features))

    def training_outputs(self, images=None, *, image_features=None) -> TrainOutputs:
        if image_features is None:
            image_features = self.encode_image(images)
        text = self.domain_text_features(image_features)
        return TrainOutputs(self, self.logits(image_features, text), image_features, text, images)

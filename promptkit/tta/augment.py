"""TPT's view generator, batched: the original plus `n_views - 1` random resized crops with flips
(optionally AugMix), as tensors on the images' device.

Crops are drawn with torchvision's RandomResizedCrop rule (scale 0.08-1, ratio 3/4-4/3) and
resampled for all views at once with one bilinear `grid_sample`; normalised images can be cropped
directly because resampling is linear. AugMix needs [0, 1] pixels: images are un-normalised with
`mean`/`std`, mixed, and normalised again.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("crop", "augmix", "auto")


def as_image_batch(images, preprocess=None, image_size: int | None = None) -> torch.Tensor:
    """PIL images (preprocessed with `preprocess`) or an image tensor -> [B, 3, H, W] float."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        if not torch.is_tensor(images[0]):
            if preprocess is None:
                raise ValueError("PIL images need a preprocess transform (FrozenCLIP.preprocess)")
            images = [preprocess(im.convert("RGB")) for im in images]  # grayscale / RGBA -> RGB
        images = torch.stack(list(images))
    elif not torch.is_tensor(images):
        if preprocess is None:
            raise ValueError("a PIL image needs a preprocess transform (FrozenCLIP.preprocess)")
        images = preprocess(images.convert("RGB")).unsqueeze(0)
    if images.dim() == 3:
        raise ValueError(f"got a single image of shape {tuple(images.shape)}; pass a batch [B, 3, H, W] "
                         f"(e.g. image.unsqueeze(0))")
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # grayscale: replicate, as PIL's convert("RGB")
    elif images.shape[1] == 4:
        raise ValueError("RGBA tensors are ambiguous (alpha over what background?); convert to RGB first, "
                         "e.g. PIL image.convert('RGB') or pass PIL images")
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"images are {tuple(images.shape[-2:])} but the model expects {image_size}x{image_size}; "
                         f"preprocess them with FrozenCLIP.preprocess (resize + centre crop)")
    return images.float()


def crop_boxes(n: int, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """[n, 4] boxes (cx, cy, w, h) in [-1, 1] coordinates, RandomResizedCrop's distribution
    (10 attempts per box, falling back to the whole image)."""
    attempts = 10
    area = torch.empty(n, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w, h = (area * aspect).sqrt(), (area / aspect).sqrt()
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)
    w = torch.where(first >= 0, w.gather(1, pick[:, None]).squeeze(1), torch.ones(n))
    h = torch.where(first >= 0, h.gather(1, pick[:, None]).squeeze(1), torch.ones(n))
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    return torch.stack([cx, cy, w, h], dim=1)


def random_crops(images: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """[B, n, 3, H, W] random resized crops with random horizontal flips."""
    b, c, height, width = images.shape
    boxes = crop_boxes(b * n, generator).to(images.device)
    flip = (torch.rand(b * n, generator=generator) < 0.5).to(images.device).float() * -2 + 1
    theta = torch.zeros(b * n, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = boxes[:, 2] * flip, boxes[:, 0]
    theta[:, 1, 1], theta[:, 1, 2] = boxes[:, 3], boxes[:, 1]
    grid = F.affine_grid(theta, (b * n, c, height, width), align_corners=False)
    source = images.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(b * n, c, height, width)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False).view(b, n, c, height, width)


def _augmix_ops():
    import torchvision.transforms.v2.functional as TF

    def to_uint8(x):
        return (x * 255).round().to(torch.uint8)

    return [
        lambda x, m: TF.autocontrast(x),
        lambda x, m: TF.equalize(to_uint8(x)).float() / 255,
        lambda x, m: TF.posterize(to_uint8(x), int(4 - m * 3)).float() / 255,
        lambda x, m: TF.solarize(x, 1 - m),
        lambda x, m: TF.rotate(x, float(30 * m)),
        lambda x, m: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[float(16 * m), 0.0]),
        lambda x, m: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, float(16 * m)]),
        lambda x, m: TF.affine(x, angle=0.0, translate=[int(m * x.shape[-1] / 3), 0], scale=1.0, shear=[0.0, 0.0]),
        lambda x, m: TF.affine(x, angle=0.0, translate=[0, int(m * x.shape[-2] / 3)], scale=1.0, shear=[0.0, 0.0]),
    ]


def augmix(views: torch.Tensor, generator: torch.Generator, severity: int = 1, width: int = 3) -> torch.Tensor:
    """AugMix (Hendrycks et al.) on [N, 3, H, W] pixels in [0, 1], as TPT uses it: `width` chains of 1-3
    random ops, Dirichlet-weighted, mixed with the input by a Beta(1, 1) weight. Each op runs on the
    group of views that drew it, so the cost is a few batched calls, not one per view."""
    ops = _augmix_ops()
    n = views.shape[0]
    weights = torch.distributions.Dirichlet(torch.ones(width)).sample((n,)).to(views.device)
    mix_weight = torch.rand(n, generator=generator).to(views.device)[:, None, None, None]
    mixed = torch.zeros_like(views)
    for chain in range(width):
        x = views
        depth = torch.randint(1, 4, (n,), generator=generator)
        for level in range(3):
            op = torch.randint(len(ops), (n,), generator=generator)
            magnitude = severity / 10 * float(torch.rand((), generator=generator)) * 3
            out = x.clone()
            for k in range(len(ops)):
                index = ((op == k) & (depth > level)).nonzero().flatten().to(views.device)
                if len(index):
                    out[index] = ops[k](x[index], min(magnitude, 1.0)).clamp(0, 1)
            x = out
        mixed = mixed + weights[:, chain, None, None, None] * x
    return (1 - mix_weight) * views + mix_weight * mixed


def make_views(images: torch.Tensor, n_views: int, mode: str = "crop", generator: torch.Generator | None = None,
               mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)) -> torch.Tensor:
    """[B, n_views, 3, H, W]: view 0 is the (preprocessed, centre-cropped) image itself."""
    if mode not in ("crop", "augmix"):
        raise ValueError(f"augment must be one of {MODES}, got {mode!r}")
    generator = generator or torch.Generator().manual_seed(0)
    crops = random_crops(images, n_views - 1, generator)
    if mode == "augmix":
        m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        flat = crops.flatten(0, 1)
        flat = (augmix(flat * s + m, generator) - m) / s
        crops = flat.view_as(crops)
    return torch.cat([images.unsqueeze(1), crops], dim=1)

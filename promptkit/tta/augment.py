"""TPT's view generator, batched: the original plus `n_views - 1` random resized crops with flips
(optionally AugMix), as tensors on the images' device.

Crops follow torchvision's RandomResizedCrop rule (scale 0.08-1, ratio 3/4-4/3) and are resampled
for all views at once with one bilinear `grid_sample`; normalised images can be cropped directly
because resampling is linear. AugMix works on pixels in [0, 1]: the views are un-normalised with the
preprocessing mean/std (CLIP's unless the model's preprocess says otherwise), mixed, and normalised again.

One difference from the research code: TPT crops the full-resolution PIL image, here the crops come
from the preprocessed (resized, centre-cropped) image, so that views are cheap batched tensor ops.
For square-ish photos the two coincide; for wide images the crops never reach the cut-off borders.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("crop", "augmix", "auto")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_image_batch(images, preprocess=None, image_size: int | None = None, mean=CLIP_MEAN,
                   std=CLIP_STD) -> torch.Tensor:
    """PIL images (run through `preprocess`), a list of image tensors or an image tensor -> [B, 3, H, W] float.

    Float tensors must already be preprocessed (resized, centre-cropped, normalised with `mean`/`std`);
    uint8 tensors are raw pixels and get normalised here. Grayscale (1 channel) is replicated to RGB;
    PIL images of any mode are converted to RGB.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        if not torch.is_tensor(images[0]):
            if preprocess is None:
                raise ValueError("PIL images need a preprocess transform (FrozenCLIP.preprocess)")
            images = [preprocess(im.convert("RGB")) for im in images]  # grayscale / RGBA / palette -> RGB
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
    if images.shape[1] == 4:
        raise ValueError("RGBA tensors are ambiguous (alpha over what background?); drop or composite the "
                         "alpha channel first, or pass PIL images (converted with image.convert('RGB'))")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # grayscale: replicate, as PIL's convert("RGB")
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"images are {tuple(images.shape[-2:])} but the model expects {image_size}x{image_size}; "
                         f"preprocess them with FrozenCLIP.preprocess (resize + centre crop)")
    if images.dtype == torch.uint8:
        return normalize(images.float() / 255, mean, std)
    return images.float()


def normalize(pixels: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    m, s = _channels(mean, pixels), _channels(std, pixels)
    return (pixels - m) / s


def denormalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    return images * _channels(std, images) + _channels(mean, images)


def _channels(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)


def crop_boxes(n: int, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """[n, 4] boxes (cx, cy, w, h) in [-1, 1] coordinates of a square image, RandomResizedCrop's
    distribution (10 attempts per box, falling back to the whole image)."""
    attempts = 10
    area = torch.empty(n, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w, h = (area * aspect).sqrt(), (area / aspect).sqrt()
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.ones(n))
    h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.ones(n))
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    return torch.stack([cx, cy, w, h], dim=1)


def random_crops(images: torch.Tensor, n: int, generator: torch.Generator, scale=(0.08, 1.0)) -> torch.Tensor:
    """[B, n, 3, H, W] random resized crops of `images` [B, 3, H, W] covering `scale` of the image area,
    each flipped with probability 1/2."""
    b, c, height, width = images.shape
    boxes = crop_boxes(b * n, generator, scale)
    flip = torch.where(torch.rand(b * n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b * n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = boxes[:, 2] * flip, boxes[:, 0]
    theta[:, 1, 1], theta[:, 1, 2] = boxes[:, 3], boxes[:, 1]
    source = images.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(b * n, c, height, width)
    return _warp(source, theta, padding="border").view(b, n, c, height, width)


def _warp(x: torch.Tensor, theta: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear resampling of x [N, C, H, W] at affine_grid(theta [N, 2, 3]) (normalised output -> input)."""
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


# -- AugMix ops (TPT's list, Hendrycks et al.'s magnitudes) on pixels in [0, 1], one parameter per view --------
def _autocontrast(x, level, sign):
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp(min=1e-8), x)


def _equalize(x, level, sign):
    import torchvision.transforms.v2.functional as TF

    return TF.equalize((x * 255).round().to(torch.uint8)).to(x.dtype) / 255


def _posterize(x, level, sign):
    drop = (level * 4 / 10).floor()                      # bits dropped below PIL's 4 kept bits
    step = (2.0 ** (4 + drop)).view(-1, 1, 1, 1)         # keep 4 - drop of the 8 bits
    return ((x * 255).round() / step).floor() * step / 255


def _solarize(x, level, sign):
    threshold = (256 - (level * 256 / 10).floor()).view(-1, 1, 1, 1) / 255
    return torch.where(x >= threshold, 1 - x, x)


def _affine(a, b, c, d, e, f, size):
    """theta [N, 2, 3] in normalised coordinates for PIL's pixel affine (x_in = a x + b y + c, y_in = d x + e y + f)."""
    theta = torch.stack([torch.stack([a, b, a + b + 2 * c / size - 1], -1),
                         torch.stack([d, e, d + e + 2 * f / size - 1], -1)], 1)
    return theta


def _rotate(x, level, sign):
    angle = torch.deg2rad(sign * (level * 30 / 10).floor())
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    return _warp(x, theta, padding="zeros")


def _shear_x(x, level, sign):
    one, zero, s = torch.ones_like(level), torch.zeros_like(level), sign * level * 0.3 / 10
    return _warp(x, _affine(one, s, zero, zero, one, zero, x.shape[-1]), padding="zeros")


def _shear_y(x, level, sign):
    one, zero, s = torch.ones_like(level), torch.zeros_like(level), sign * level * 0.3 / 10
    return _warp(x, _affine(one, zero, zero, s, one, zero, x.shape[-1]), padding="zeros")


def _translate_x(x, level, sign):
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    shift = sign * (level * x.shape[-1] / 3 / 10).floor()
    return _warp(x, _affine(one, zero, shift, zero, one, zero, x.shape[-1]), padding="zeros")


def _translate_y(x, level, sign):
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    shift = sign * (level * x.shape[-2] / 3 / 10).floor()
    return _warp(x, _affine(one, zero, zero, zero, one, shift, x.shape[-1]), padding="zeros")


AUGMIX_OPS = (_autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y, _translate_x,
              _translate_y)


def augmix(pixels: torch.Tensor, generator: torch.Generator, severity: float = 1.0, width: int = 3,
           max_depth: int = 3) -> torch.Tensor:
    """AugMix as TPT uses it, on [N, 3, H, W] pixels in [0, 1]: `width` chains of 1-`max_depth` random ops
    (level ~ U(0.1, severity), random sign), mixed with Dirichlet(1) weights, then blended with the input
    by a Beta(1, 1) weight. Every view draws its own ops and parameters; each op runs once on the group
    of views that drew it, so the cost is a few dozen batched calls, not one per view."""
    n = len(pixels)
    weights = -torch.rand(n, width, generator=generator).log()    # Dirichlet(1, ..., 1): normalised Exp(1)
    weights = (weights / weights.sum(1, keepdim=True)).to(pixels.device)
    keep = torch.rand(n, generator=generator).to(pixels.device)    # Beta(1, 1)
    mixed = torch.zeros_like(pixels)
    for chain in range(width):
        x = pixels
        depth = torch.randint(1, max_depth + 1, (n,), generator=generator)
        for step in range(max_depth):
            op = torch.where(depth > step, torch.randint(len(AUGMIX_OPS), (n,), generator=generator), -1)
            level = torch.empty(n).uniform_(0.1, severity, generator=generator)
            sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
            out = x.clone()
            for k, fn in enumerate(AUGMIX_OPS):
                rows = (op == k).nonzero().flatten()
                if len(rows):
                    index = rows.to(pixels.device)
                    out[index] = fn(x[index], level[rows].to(pixels.device), sign[rows].to(pixels.device)).clamp(0, 1)
            x = out
        mixed += weights[:, chain, None, None, None] * x
    keep = keep[:, None, None, None]
    return keep * pixels + (1 - keep) * mixed


def make_views(images: torch.Tensor, n_views: int, mode: str = "crop", generator: torch.Generator | None = None,
               mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[B, n_views, 3, H, W] views of preprocessed `images` [B, 3, H, W]: view 0 is the image itself,
    the others random resized crops with flips ("crop"), AugMix-ed as well for "augmix".

    Args:
        images: normalised with `mean` / `std` (AugMix un-normalises them to pixels and back).
        n_views: views per image, the original included.
        mode: "crop" or "augmix".
        generator: CPU generator for all random draws (default: seeded with 0).
    """
    if mode not in ("crop", "augmix"):
        raise ValueError(f"augment must be 'crop' or 'augmix' ('auto' is resolved by the adapter), got {mode!r}")
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    generator = generator or torch.Generator().manual_seed(0)
    crops = random_crops(images, n_views - 1, generator)
    if mode == "augmix" and n_views > 1:
        flat = denormalize(crops.flatten(0, 1), mean, std).clamp(0, 1)
        crops = normalize(augmix(flat, generator), mean, std).view_as(crops)
    return torch.cat([images.unsqueeze(1), crops], dim=1)

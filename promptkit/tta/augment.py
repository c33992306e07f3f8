"""TPT's view generator, batched: the original plus `n_views - 1` random resized crops with flips
(optionally AugMix), as tensors on the images' device.

Crops follow torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, integer pixel boxes, 10
attempts then a centre crop), as TPT draws them. Like TPT, crops of PIL images are cut from the
full-resolution photo and resized with antialiasing, so a small crop keeps the detail the 224-px
original lost; an already preprocessed tensor can only be cropped and upsampled in place (one batched
`grid_sample`): pass PIL images for TPT's views. AugMix works on pixels in [0, 1], un-normalised with
the preprocessing mean/std (CLIP's unless the model's preprocess says otherwise) and normalised again.
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


def photo_pixels(images) -> list[torch.Tensor] | None:
    """Full-resolution RGB pixels in [0, 1] ([3, H, W] each) of PIL images, or None for tensors."""
    if torch.is_tensor(images) or (isinstance(images, (list, tuple)) and images and torch.is_tensor(images[0])):
        return None
    import torchvision.transforms.v2.functional as TF

    photos = images if isinstance(images, (list, tuple)) else [images]
    return [TF.pil_to_tensor(photo.convert("RGB")).float() / 255 for photo in photos]


def normalize(pixels: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    m, s = _channels(mean, pixels), _channels(std, pixels)
    return (pixels - m) / s


def denormalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    return images * _channels(std, images) + _channels(mean, images)


def _channels(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)


def crop_boxes(n: int, generator: torch.Generator, height: int, width: int, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """[n, 4] integer boxes (top, left, h, w) in a `height` x `width` image, RandomResizedCrop's rule: up to
    10 attempts at an area fraction ~ U(scale) and log aspect ~ U(log ratio), else the centre crop of the
    image clamped to `ratio`."""
    attempts = 10
    area = torch.empty(n, attempts).uniform_(*scale, generator=generator) * (height * width)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(1, keepdim=True)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback = (width, round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback = (round(height * ratio[1]), height)
    else:
        fallback = (width, height)
    found = ok.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback[0]))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback[1]))
    top = (torch.rand(n, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(n, generator=generator) * (width - w + 1)).floor()
    top = torch.where(found, top, ((height - h) / 2).floor())
    left = torch.where(found, left, ((width - w) / 2).floor())
    return torch.stack([top, left, h, w], dim=1).long()


def random_crops(images: torch.Tensor, n: int, generator: torch.Generator, scale=(0.08, 1.0)) -> torch.Tensor:
    """[B, n, 3, H, W] random resized crops of `images` [B, 3, H, W] covering `scale` of the image area,
    each flipped with probability 1/2, resampled in place (bilinear)."""
    b, c, height, width = images.shape
    top, left, h, w = crop_boxes(b * n, generator, height, width, scale).float().unbind(1)
    flip = torch.where(torch.rand(b * n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b * n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w / width * flip, (2 * left + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * top + h) / height - 1
    source = images.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(b * n, c, height, width)
    return _warp(source, theta, padding="border").view(b, n, c, height, width)


def photo_crops(pixels: torch.Tensor, n: int, size: int, generator: torch.Generator,
                scale=(0.08, 1.0)) -> torch.Tensor:
    """[n, 3, size, size] random resized crops cut at full resolution, each resized with antialiased bilinear
    interpolation (torchvision's tensor RandomResizedCrop) and flipped with probability 1/2.

    Args:
        pixels: one image [3, H, W] (any size) to cut n crops from, or [n, 3, H, W] to cut one crop from each.
        scale: range of the crop's share of the image area.
    """
    if pixels.dim() == 3:
        pixels = pixels.expand(n, -1, -1, -1)
    boxes = crop_boxes(n, generator, *pixels.shape[-2:], scale).tolist()
    flip = (torch.rand(n, generator=generator) < 0.5).tolist()
    crops = []
    for image, (top, left, h, w), mirrored in zip(pixels, boxes, flip):
        crop = F.interpolate(image[None, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)
        crops.append(crop.flip(-1) if mirrored else crop)
    return torch.cat(crops).clamp(0, 1)


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
               mean=CLIP_MEAN, std=CLIP_STD, photos: list[torch.Tensor] | None = None) -> torch.Tensor:
    """[B, n_views, 3, H, W] views of preprocessed `images` [B, 3, H, W]: view 0 is the image itself,
    the others random resized crops with flips ("crop"), AugMix-ed as well for "augmix".

    Args:
        images: normalised with `mean` / `std`.
        n_views: views per image, the original included.
        mode: "crop" or "augmix".
        generator: CPU generator for all random draws (default: seeded with 0).
        photos: optional full-resolution pixels in [0, 1] ([3, H_i, W_i], one per image) to cut the
            crops from, as TPT does; default: crop `images` themselves.
    """
    if mode not in ("crop", "augmix"):
        raise ValueError(f"augment must be 'crop' or 'augmix' ('auto' is resolved by the adapter), got {mode!r}")
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if n_views == 1:
        return images.unsqueeze(1)
    generator = generator or torch.Generator().manual_seed(0)
    if photos is None:
        crops = denormalize(random_crops(images, n_views - 1, generator), mean, std)
    else:
        size = images.shape[-1]
        crops = torch.stack([photo_crops(p.to(images.device, images.dtype), n_views - 1, size, generator)
                             for p in photos])
    if mode == "augmix":
        crops = augmix(crops.flatten(0, 1).clamp(0, 1), generator).view_as(crops)
    return torch.cat([images.unsqueeze(1), normalize(crops, mean, std)], dim=1)

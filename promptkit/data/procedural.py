"""A procedural colour x shape benchmark: deterministic, vectorised, no files.

48 classes ("red circle", "blue triangle", ...) rendered as small RGB images in a clean `photo`
domain (smooth textured background, position / scale / rotation / lighting jitter) and three
shifted domains modelling natural distribution shift: `sketch` (coloured outline on paper),
`noisy` (heavy sensor noise and blur) and `palette` (striped, high-contrast backgrounds with a
global colour cast). A fifth domain, `plain` (flat backgrounds, no noise), is the style of the data
`promptkit-tiny` was pretrained on. A class is recoverable by a person in every domain.

Class order is fixed: the 24 base classes come first, then the 24 novel ones. Base and novel are
a checkerboard over (colour, shape), so every colour and every shape occurs in both halves and the
novel classes are unseen *combinations* of seen words.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.12, 0.68, 0.20), "blue": (0.15, 0.25, 0.92), "yellow": (0.96, 0.88, 0.10),
    "purple": (0.55, 0.15, 0.75), "orange": (1.00, 0.55, 0.05), "pink": (1.00, 0.52, 0.78), "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
_PAIRS = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
_ORDER = [p for p in _PAIRS if sum(p) % 2 == 0] + [p for p in _PAIRS if sum(p) % 2 == 1]
CLASSNAMES: tuple[str, ...] = tuple(f"{list(COLOURS)[c]} {SHAPES[s]}" for c, s in _ORDER)
DOMAINS = ("photo", "sketch", "noisy", "palette", "plain")
SHIFTED_DOMAINS = ("sketch", "noisy", "palette")
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
_COLOUR_TABLE = torch.tensor(list(COLOURS.values()))


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _shape_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance-like value per pixel (< 0 inside) in shape units (the shape spans about [-1, 1])."""
    r, phi = torch.sqrt(u * u + v * v), torch.atan2(v, u)
    au, av = u.abs(), v.abs()
    candidates = torch.stack([
        r - 0.95,                                                                        # circle
        torch.maximum(au, av) - 0.8,                                                     # square
        torch.maximum(-v - 0.55, (math.sqrt(3) * au + v - 1.0) / 2),                     # triangle
        r - (0.62 + 0.33 * torch.cos(5 * phi)),                                          # star
        torch.minimum(torch.maximum(au - 0.3, av - 0.95), torch.maximum(av - 0.3, au - 0.95)),  # cross
        (r - 0.7).abs() - 0.25,                                                          # ring
    ])
    return candidates.gather(0, shape.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def _smooth_noise(n: int, size: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 1, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def render(labels: Sequence[int] | torch.Tensor, domain: str = "photo", seed: int = 0, image_size: int = 32) -> torch.Tensor:
    """Renders one image per label in `domain`. Returns [N, 3, H, W] in [0, 1]; a pure function of its arguments."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    n, size = len(labels), image_size
    g = torch.Generator().manual_seed(_seed("render", domain, seed, size))
    pairs = torch.tensor(_ORDER)[labels]
    colour_idx, shape = pairs[:, 0], pairs[:, 1]

    scale = 0.45 + 0.25 * torch.rand(n, generator=g)                     # radius as a fraction of the image
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 2 * (0.95 - scale.unsqueeze(1))
    angle = torch.rand(n, generator=g) * 2 * math.pi
    coords = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = (x - centre[:, 0, None, None]) / scale[:, None, None]
    dy = (y - centre[:, 1, None, None]) / scale[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    dist = _shape_distance(shape, cos * dx + sin * dy, -sin * dx + cos * dy)
    pixels_per_unit = scale[:, None, None] * size / 2
    colour = (_COLOUR_TABLE[colour_idx] + 0.06 * torch.randn(n, 3, generator=g)).clamp(0, 1)
    light = 0.85 + 0.3 * torch.rand(n, 1, generator=g)
    colour = (colour * light).clamp(0, 1)[:, :, None, None]

    if domain == "sketch":
        alpha = (1.2 - (dist * pixels_per_unit).abs()).clamp(0, 1).unsqueeze(1)   # ~2 px outline
        paper = 0.85 + 0.1 * torch.rand(n, 1, 1, 1, generator=g)
        background = paper + 0.04 * _smooth_noise(n, size, 8, g)
        image = background * (1 - alpha) + colour * alpha
    else:
        alpha = (0.5 - dist * pixels_per_unit).clamp(0, 1).unsqueeze(1)
        if domain == "palette":
            stripes = torch.sin(2 * math.pi * (x * torch.rand(n, 1, 1, generator=g) * 4 + y * 3))
            hues = torch.rand(n, 3, 2, generator=g)
            t = (stripes.unsqueeze(1) > 0).float()
            background = hues[..., 0, None, None] * t + hues[..., 1, None, None] * (1 - t)
        elif domain == "plain":
            background = (torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2).expand(n, 3, size, size)
        else:
            tint = torch.rand(n, 3, 2, generator=g) * 0.6 + 0.2
            t = _smooth_noise(n, size, 4, g)
            background = tint[..., 0, None, None] * t + tint[..., 1, None, None] * (1 - t)
        if domain != "plain":
            background = background + 0.03 * torch.randn(n, 3, size, size, generator=g)
        image = background * (1 - alpha) + colour * alpha
        if domain == "palette":
            cast = 0.75 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
            image = (image - 0.5) * 1.3 + 0.5
            image = image * cast
        elif domain == "noisy":
            image = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            image = image + 0.16 * torch.randn(n, 3, size, size, generator=g)
    return image.clamp(0, 1)


class SyntheticImages(Dataset):
    """Rendered images with `classnames` and `targets`; yields `(image, label)`."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classnames: Sequence[str], normalize: bool = True):
        if normalize:
            images = (images - ProceduralBenchmark.MEAN) / ProceduralBenchmark.STD
        self.images, self.targets, self.classnames = images, targets.tolist(), list(classnames)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


class ProceduralBenchmark:
    """Standard splits of the procedural benchmark.

    Args:
        image_size: side of the square images.
        seed: benchmark seed; every split is a pure function of it and the split's own arguments.
        n_test: images per class in `test` and in `shifted` (split evenly over the shifted domains).
    """

    MEAN = torch.tensor(MEAN).view(3, 1, 1)
    STD = torch.tensor(STD).view(3, 1, 1)

    def __init__(self, image_size: int = 32, seed: int = 0, n_test: int = 24):
        self.image_size, self.seed, self.n_test = image_size, seed, n_test
        self.classnames = list(CLASSNAMES)
        half = math.ceil(len(self.classnames) / 2)
        self.base_labels, self.novel_labels = list(range(half)), list(range(half, len(self.classnames)))
        self.base_classnames = self.classnames[:half]
        self.novel_classnames = self.classnames[half:]

    def split(self, name: str, shots: int | None = None, seed: int = 1, classes: str = "all",
              domain: str | None = None, normalize: bool = True) -> SyntheticImages:
        """A dataset of `(image, label)`.

        Args:
            name: "train" / "val" (few-shot, photo domain, `shots` per class), "test" (photo) or
                "shifted" (the shifted domains, equally).
            shots: images per class for train (default 16) / val (default 4).
            seed: few-shot sampling seed (train/val only).
            classes: "all", "base" or "novel" (relabelled from 0).
            domain: render every image in this domain instead.
            normalize: CLIP mean/std normalisation (False: [0, 1]).
        """
        labels = {"all": range(len(self.classnames)), "base": self.base_labels, "novel": self.novel_labels}
        if classes not in labels:
            raise ValueError(f"classes must be 'all', 'base' or 'novel', got {classes!r}")
        chosen = torch.tensor(list(labels[classes]))
        if name in ("train", "val"):
            per_class, key = shots or (16 if name == "train" else 4), (name, seed)
        elif name in ("test", "shifted"):
            per_class, key = self.n_test, (name,)
        else:
            raise ValueError(f"unknown split {name!r}; use 'train', 'val', 'test' or 'shifted'")
        targets = chosen.repeat_interleave(per_class)
        if domain is None and name == "shifted":
            domains = [SHIFTED_DOMAINS[i % len(SHIFTED_DOMAINS)] for i in range(len(targets))]
        else:
            domains = [domain or "photo"] * len(targets)
        images = torch.empty(len(targets), 3, self.image_size, self.image_size)
        for d in set(domains):
            index = torch.tensor([i for i, di in enumerate(domains) if di == d])
            images[index] = render(targets[index], d, _seed(self.seed, *key, d, classes), self.image_size)
        relabel = {int(c): i for i, c in enumerate(chosen)}
        local = torch.tensor([relabel[int(t)] for t in targets])
        return SyntheticImages(images, local, [self.classnames[int(c)] for c in chosen], normalize)

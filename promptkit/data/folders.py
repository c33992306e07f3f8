"""Few-shot datasets from disk: class folders and CoOp's split files."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class _Files(Dataset):
    """(path, label) samples read with PIL, RGB, through `transform`."""

    def __init__(self, samples, classnames, transform=None, skip_unreadable: bool = False):
        self.samples, self.classnames, self.transform = list(samples), list(classnames), transform
        self.skipped: list[str] = []
        if skip_unreadable:
            readable = []
            for path, label in self.samples:
                try:
                    with Image.open(path) as im:
                        im.verify()
                    readable.append((path, label))
                except (OSError, UnidentifiedImageError):
                    self.skipped.append(str(path))
            if self.skipped:
                warnings.warn(f"skipped {len(self.skipped)} unreadable images, e.g. {self.skipped[0]}")
            self.samples = readable
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {path} ({err}); fix or remove it, or pass skip_unreadable=True") from err
        return (self.transform(image) if self.transform else image), label


class ImageFolderDataset(_Files):
    """`root/<class>/<image>`; classes sorted by folder name, `_` in names read as spaces.

    Args:
        root: dataset folder.
        transform: applied to each PIL image (e.g. `clip.preprocess`).
        skip_unreadable: skip (and count in `.skipped`) files PIL cannot read instead of failing.
    """

    def __init__(self, root, transform=None, skip_unreadable: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"{root} has no class folders; expected root/<class name>/<images>")
        samples = []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            samples += [(p, label) for p in files]
        super().__init__(samples, [f.name.replace("_", " ") for f in folders], transform, skip_unreadable)


class CoOpSplitDataset(_Files):
    """One split of CoOp's `split_zhou_<Dataset>.json`: `{"train"|"val"|"test": [[relpath, label, classname], ...]}`.

    Args:
        root: image folder the relative paths start from.
        split_json: the split file.
        split: "train", "val" or "test".
    """

    def __init__(self, root, split_json, split: str, transform=None, skip_unreadable: bool = False):
        split_json = Path(split_json)
        if not split_json.is_file():
            raise FileNotFoundError(f"split file {split_json} does not exist")
        data = json.loads(split_json.read_text())
        if split not in data:
            raise ValueError(f"{split_json} has no split {split!r}; it has {sorted(data)}")
        names: dict[int, str] = {}
        for split_items in data.values():
            for _, label, name in split_items:
                if names.setdefault(int(label), name) != name:
                    raise ValueError(f"{split_json}: label {label} is both {names[int(label)]!r} and {name!r}")
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{split_json}: labels must be 0..{len(names) - 1} without gaps")
        samples = [(Path(root) / rel, int(label)) for rel, label, _ in data[split]]
        if not samples:
            raise ValueError(f"split {split!r} of {split_json} is empty")
        super().__init__(samples, [names[i] for i in range(len(names))], transform, skip_unreadable)


class Subset(Dataset):
    """Some samples of a dataset, optionally relabelled; keeps `classnames` and `targets`."""

    def __init__(self, dataset, indices: Sequence[int], relabel: dict[int, int] | None = None,
                 classnames: Sequence[str] | None = None):
        self.dataset, self.indices, self.relabel = dataset, list(indices), relabel
        self.classnames = list(classnames if classnames is not None else dataset.classnames)
        targets = [dataset.targets[i] for i in self.indices]
        self.targets = [relabel[t] for t in targets] if relabel else targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, _ = self.dataset[self.indices[index]]
        return image, self.targets[index]


def few_shot(dataset, k: int, seed: int = 1, allow_fewer: bool = False) -> Subset:
    """`k` images per class, a pure function of (`seed`, the dataset's targets). Validation sets use
    `min(k, 4)` shots, as CoOp.

    Raises:
        ValueError: a class has fewer than `k` images (unless `allow_fewer`, which warns and takes all).
    """
    targets = torch.as_tensor(dataset.targets)
    generator = torch.Generator().manual_seed(seed)
    chosen, short = [], []
    for label in range(len(dataset.classnames)):
        members = (targets == label).nonzero().flatten()
        if len(members) < k:
            short.append(f"{dataset.classnames[label]!r} ({len(members)})")
        chosen += members[torch.randperm(len(members), generator=generator)[:k]].tolist()
    if short:
        message = f"{len(short)} classes have fewer than {k} images: {', '.join(short[:5])}"
        if not allow_fewer:
            raise ValueError(message + "; use fewer shots or allow_fewer=True")
        warnings.warn(message + "; using all their images")
    return Subset(dataset, sorted(chosen))


@dataclass
class BaseNovelSplit:
    base: list[int]
    novel: list[int]
    base_classnames: list[str]
    novel_classnames: list[str]


def base_novel(classnames: Sequence[str]) -> BaseNovelSplit:
    """CoOp/CoCoOp's base-to-novel split: labels in order, the first ceil(n/2) are base."""
    half = math.ceil(len(classnames) / 2)
    labels = list(range(len(classnames)))
    return BaseNovelSplit(labels[:half], labels[half:], list(classnames[:half]), list(classnames[half:]))


def select_classes(dataset, labels: Sequence[int]) -> Subset:
    """Only the samples of `labels`, relabelled 0..len(labels)-1 in the given order."""
    relabel = {int(label): i for i, label in enumerate(labels)}
    indices = [i for i, t in enumerate(dataset.targets) if t in relabel]
    return Subset(dataset, indices, relabel, [dataset.classnames[label] for label in labels])


def train_transform(clip):
    """CoOp's training augmentation at the model's resolution: random resized crop (scale 0.08-1,
    bicubic), horizontal flip, CLIP normalisation."""
    from torchvision import transforms as T

    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    normalize = next((t for t in getattr(clip.preprocess, "transforms", []) if isinstance(t, T.Normalize)),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)))
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), normalize])

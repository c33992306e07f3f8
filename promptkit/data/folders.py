"""Few-shot datasets from disk: class folders and CoOp's split files, few-shot sampling, base/novel classes."""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VAL_SHOTS = 4  # CoOp validates on min(k, 4) images per class
# Random ops of torchvision (RandomResizedCrop, ColorJitter, AugMix, ...) and open_clip (color_jitter, gray_scale).
_RANDOM_OP = re.compile(r"random|jitter|augment|augmix|gray_scale|elastic", re.IGNORECASE)


def _visible(path: Path) -> bool:
    # `.ipynb_checkpoints`, `.DS_Store`, `._x.jpg` (macOS resource forks) are not classes or images.
    return not path.name.startswith(".")


class _Files(Dataset):
    """(path, label) samples read with PIL, RGB, through `transform`."""

    def __init__(self, samples, classnames, transform=None, skip_unreadable: bool = False):
        self.samples, self.classnames, self.transform = list(samples), list(classnames), transform
        self.skipped: list[str] = []
        if skip_unreadable:
            readable = []
            for path, label in self.samples:
                try:
                    with Image.open(path) as image:
                        image.verify()
                    readable.append((path, label))
                except (OSError, UnidentifiedImageError):
                    self.skipped.append(str(path))
            if self.skipped:
                warnings.warn(f"skipped {len(self.skipped)} unreadable images, e.g. {self.skipped[0]}")
            self.samples = readable
        if not self.samples:
            raise ValueError("no readable images left: every file was unreadable")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {path} ({err}); fix or remove it, "
                             f"or pass skip_unreadable=True (CLI: --skip-unreadable)") from err
        return (self.transform(image) if self.transform else image), label


class ImageFolderDataset(_Files):
    """`root/<class>/<images>`: classes sorted by folder name, `_` in folder names read as spaces.

    Args:
        root: dataset folder.
        transform: applied to each PIL image (e.g. `clip.preprocess`, or `train_transform(clip)`).
        skip_unreadable: skip files PIL cannot read (listed in `.skipped`) instead of failing when they are loaded.

    Raises:
        FileNotFoundError: `root` does not exist.
        ValueError: no class folders, or a class folder without images.
    """

    def __init__(self, root, transform=None, skip_unreadable: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
        if not folders:
            raise ValueError(f"{root} has no class folders; expected {root}/<class name>/<images>")
        samples = []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p))
            if not files:
                raise ValueError(f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                                 f"add images or remove the folder")
            samples += [(p, label) for p in files]
        super().__init__(samples, [f.name.replace("_", " ") for f in folders], transform, skip_unreadable)


class CoOpSplitDataset(_Files):
    """One split of CoOp's `split_zhou_<Dataset>.json`: `{"train"|"val"|"test": [[relpath, label, classname], ...]}`.

    Class names come from the file, ordered by label, `_` read as a space; labels must be 0..C-1 over all splits,
    each with one name.

    Args:
        root: image folder the relative paths start from (e.g. `caltech-101/101_ObjectCategories`).
        split_json: the split file.
        split: "train", "val" or "test".
        transform: applied to each PIL image.
        skip_unreadable: as in `ImageFolderDataset`.
    """

    def __init__(self, root, split_json, split: str, transform=None, skip_unreadable: bool = False):
        root, split_json = Path(root), Path(split_json)
        if not split_json.is_file():
            raise FileNotFoundError(f"split file {split_json} does not exist")
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        try:
            data = json.loads(split_json.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{split_json} is not valid JSON ({err})") from err
        if not isinstance(data, dict) or split not in data:
            raise ValueError(f"{split_json} has no split {split!r}; it has "
                             f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
        names: dict[int, str] = {}
        for split_name, items in data.items():
            for item in items:
                if not (isinstance(item, list) and len(item) == 3 and isinstance(item[1], int)):
                    raise ValueError(f"{split_json} [{split_name!r}]: entry {item!r} is not "
                                     f"[relpath, label (int), classname]")
                _, label, name = item
                if names.setdefault(label, name) != name:
                    raise ValueError(f"{split_json}: label {label} is both {names[label]!r} and {name!r}")
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{split_json}: labels must be 0..{len(names) - 1} without gaps; "
                             f"found {min(names)}..{max(names)}")
        samples = [(root / rel, label) for rel, label, _ in data[split]]
        if not samples:
            raise ValueError(f"split {split!r} of {split_json} is empty")
        if not samples[0][0].exists():
            raise FileNotFoundError(f"{samples[0][0]} (first image of {split!r}) does not exist; `root` must be the "
                                    f"folder the split file's paths are relative to")
        # `american_bulldog`, `Apply_Eye_Makeup`: read as spaces, as ImageFolderDataset and the official learners do.
        super().__init__(samples, [names[i].replace("_", " ") for i in range(len(names))], transform, skip_unreadable)


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


class Unlabeled(Dataset):
    """The images of a dataset without their labels, for objectives that read none (POUF, self-learning): yields
    `(image, -1)`, so batches keep their usual shape; `targets` are all -1. Keeps `classnames` where the dataset
    has them (the classes a learner predicts). `PromptTrainer.fit` takes it, or any dataset yielding bare images,
    as unlabelled training data.

    Args:
        dataset: a dataset yielding `(image, label)` (the label is never read) or bare images.
        classnames: class names, where the dataset has none.
    """

    labeled = False

    def __init__(self, dataset, classnames: Sequence[str] | None = None):
        self.dataset, self.indices = dataset, list(range(len(dataset)))
        names = classnames if classnames is not None else getattr(dataset, "classnames", None)
        self.classnames = None if names is None else list(names)
        self.targets = [-1] * len(dataset)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return (item[0] if isinstance(item, (tuple, list)) else item), -1


def is_unlabeled(dataset) -> bool:
    """Whether `dataset` holds images without labels: an `Unlabeled`, or a dataset whose items are bare images."""
    if getattr(dataset, "labeled", True) is False:
        return True
    return len(dataset) > 0 and torch.is_tensor(dataset[0])


def few_shot(dataset, k: int, seed: int = 1, allow_fewer: bool = False) -> Subset:
    """`k` images per class, a pure function of (`seed`, the dataset's `targets`). For validation use
    `few_shot_val` (`min(k, 4)` shots, as CoOp).

    Args:
        dataset: has `targets` and `classnames`.
        k: images per class.
        seed: sampling seed.
        allow_fewer: take every image of a class with fewer than `k` (with a warning) instead of failing.

    Raises:
        ValueError: `k` < 1, or a class has fewer than `k` images (the message names them and their counts).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"shots must be a positive integer, got {k!r}")
    targets = check_labels(dataset, len(dataset.classnames))
    # A stable sort keeps each class's indices ascending, so the draw depends only on (seed, targets).
    members = targets.argsort(stable=True).split(torch.bincount(targets, minlength=len(dataset.classnames)).tolist())
    generator = torch.Generator().manual_seed(seed)
    chosen = [m[torch.randperm(len(m), generator=generator)[:k]] for m in members]
    short = [f"{dataset.classnames[label]!r} ({len(m)})" for label, m in enumerate(members) if len(m) < k]
    if short:
        message = f"{len(short)} classes have fewer than {k} images: {', '.join(short[:5])}"
        if not allow_fewer:
            raise ValueError(message + "; use fewer shots or allow_fewer=True (CLI: --allow-fewer)")
        warnings.warn(message + "; using all their images")
    return Subset(dataset, torch.cat(chosen).sort().values.tolist())


def few_shot_val(dataset, k: int, seed: int = 1, allow_fewer: bool = False) -> Subset:
    """The validation set of a `k`-shot run: `few_shot` with `min(k, 4)` images per class, as CoOp."""
    return few_shot(dataset, min(k, VAL_SHOTS), seed, allow_fewer)


@dataclass
class BaseNovelSplit:
    """Labels (in the full dataset) and names of the base and novel classes."""

    base: list[int]
    novel: list[int]
    base_classnames: list[str]
    novel_classnames: list[str]


def base_novel(classnames: Sequence[str]) -> BaseNovelSplit:
    """CoOp/CoCoOp's base-to-novel split: labels in order, the first ceil(n/2) are base. Use `select_classes`
    to keep one half relabelled from 0."""
    if not classnames:
        raise ValueError("base_novel needs at least one class name")
    half = math.ceil(len(classnames) / 2)
    labels = list(range(len(classnames)))
    return BaseNovelSplit(labels[:half], labels[half:], list(classnames[:half]), list(classnames[half:]))


def select_classes(dataset, labels: Sequence[int]) -> Subset:
    """Only the samples of `labels`, relabelled 0..len(labels)-1 in the given order, `classnames` to match."""
    labels = [int(label) for label in labels]
    n_classes = len(dataset.classnames)
    bad = [label for label in labels if not 0 <= label < n_classes]
    if not labels or bad or len(set(labels)) != len(labels):
        raise ValueError(f"select_classes needs distinct labels in [0, {n_classes}); got {labels[:10]}"
                         + (f" (out of range: {bad[:5]})" if bad else ""))
    relabel = {label: i for i, label in enumerate(labels)}
    indices = [i for i, t in enumerate(dataset.targets) if t in relabel]
    return Subset(dataset, indices, relabel, [dataset.classnames[label] for label in labels])


def check_labels(dataset, n_classes: int) -> torch.Tensor:
    """The dataset's labels as a tensor, checked against a learner built for `n_classes` classes.

    Raises:
        ValueError: the dataset is empty, its `classnames` count differs from `n_classes`, or a label is
            outside [0, n_classes).
    """
    names = getattr(dataset, "classnames", None)
    if names is not None and len(names) != n_classes:
        raise ValueError(f"the dataset has {len(names)} classes but the learner was built for {n_classes}; "
                         f"build the learner with the dataset's classnames")
    targets = getattr(dataset, "targets", None)
    labels = torch.as_tensor(targets if targets is not None else [dataset[i][1] for i in range(len(dataset))]).long()
    if labels.numel() == 0:
        raise ValueError("the dataset is empty")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}) for {n_classes} classes; found [{low}, {high}]")
    return labels


def train_transform(clip, crop_scale: Sequence[float] = (0.08, 1.0), flip: bool = True,
                    interpolation: str = "bicubic"):
    """Dassl's training augmentation (CoOp and the papers built on it) at the model's resolution: random resized
    crop, horizontal flip, CLIP normalisation (the model's own, from `clip.preprocess`). Evaluate with
    `clip.preprocess` (open_clip's resize + centre crop, as TPT and CoOp). A recipe's `augment` dict holds these
    keywords: `train_transform(clip, **recipe.transform)`.

    Args:
        clip: a `FrozenCLIP`.
        crop_scale: (min, max) area fraction of the random crop, 0 < min <= max <= 1.
        flip: random horizontal flip (p 0.5).
        interpolation: torchvision's name of the resize filter ("bicubic", "bilinear", ...).

    Raises:
        ValueError: a crop scale outside (0, 1] or reversed, or an unknown interpolation.
    """
    from torchvision import transforms as T

    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {tuple(crop_scale)}")
    modes = {mode.value: mode for mode in T.InterpolationMode}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {', '.join(modes)}, got {interpolation!r}")
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    normalize = next((t for t in getattr(clip.preprocess, "transforms", []) if isinstance(t, T.Normalize)),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)))
    crop = T.RandomResizedCrop(size, scale=(low, high), interpolation=modes[interpolation])
    return T.Compose([crop, *([T.RandomHorizontalFlip()] if flip else []), T.ToTensor(), normalize])


def has_random_transform(dataset) -> bool:
    """Whether the images of `dataset` (or of the dataset a `Subset` holds) may pass a random transform. Only
    no transform, or one made of torchvision and open_clip ops none of which is random, counts as deterministic:
    any other callable may augment."""
    while getattr(dataset, "transform", None) is None and getattr(dataset, "dataset", None) is not None:
        dataset = dataset.dataset
    pending = [getattr(dataset, "transform", None)]
    while pending:
        op = pending.pop()
        if op is None:
            continue
        if hasattr(op, "transforms"):  # Compose and the like
            pending.extend(op.transforms)
            continue
        known = str(getattr(op, "__module__", "")).startswith(("torchvision", "open_clip"))
        if not known or _RANDOM_OP.search(getattr(op, "__name__", type(op).__name__)):
            return True
    return False

"""CoOp's 11 datasets and the four ImageNet shifts as recipes (`benchmarks.json`, `benchmark_classes.json`):
where each lives under a data root, how its splits and class names are read, and CoOp's few-shot sampling.

Every recipe follows CoOp's `DATASETS.md` and `datasets/*.py` (KaiyangZhou/CoOp@ff61507): the same folder
names, CoOp's `split_zhou_*.json` split files (class names as the file has them, e.g. EuroSAT's "Annual Crop
Land"), FGVC-Aircraft's own list files, ImageNet's class folders with CLIP's class names, ImageNet-V2's folders
0..999, and ImageNet-A / -R over their 200 classes only (labels 0..199 in the order of the classes' WordNet ids,
as CoOp and TPT label them).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

from .folders import IMAGE_SUFFIXES, VAL_SHOTS, Subset, _Files, _visible, base_novel, select_classes

SPLITS = ("train", "val", "test")
_FILES = resources.files(__package__)
RECIPES: dict[str, dict] = {k: v for k, v in json.loads(_FILES.joinpath("benchmarks.json").read_text()).items()
                            if not k.startswith("_")}
CLASSES: dict = json.loads(_FILES.joinpath("benchmark_classes.json").read_text())
IMAGENET_WNIDS: list[str] = CLASSES["imagenet"]["wnids"]
IMAGENET_NAMES: list[str] = CLASSES["imagenet"]["names"]
# The few-shot datasets (CoOp's 11) and the test-only ImageNet shifts.
FEW_SHOT_DATASETS = tuple(k for k, v in RECIPES.items() if v["kind"] in ("split_json", "fgvc", "imagenet"))
SHIFTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


# Every usual spelling: "imagenet_a", "ImageNet-A", "imagenet-adversarial", "caltech-101", "DescribableTextures".
_ALIASES = {}
for _name, _recipe in RECIPES.items():
    for _spelling in (_name, _recipe["title"], _recipe["folder"], _recipe.get("split_file", "")[11:-5]):
        if _spelling:
            _ALIASES[_key(_spelling)] = _name
_ALIASES.update({_key(k): v for k, v in {"flowers102": "oxford_flowers", "aircraft": "fgvc_aircraft",
                                         "pets": "oxford_pets", "cars": "stanford_cars"}.items()})


def benchmark_name(name: str) -> str:
    """The recipe name of a dataset in any usual spelling ("ImageNet-A", "caltech-101", "DescribableTextures").

    Raises:
        ValueError: no recipe has that name (the message lists them).
    """
    found = _ALIASES.get(_key(str(name)))
    if found is None:
        raise ValueError(f"no dataset recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return found


def dataset_folder(name: str, root) -> Path:
    """Where the recipe's dataset lives under the data root `root` (CoOp's folder name, e.g. `root/caltech-101`)."""
    return Path(root) / RECIPES[benchmark_name(name)]["folder"]


def splits_of(name: str) -> tuple[str, ...]:
    """The splits a recipe has: train, val and test, or test alone for the ImageNet shifts."""
    return SPLITS if RECIPES[benchmark_name(name)]["kind"] in ("split_json", "fgvc", "imagenet") else ("test",)


class BenchmarkDataset(_Files):
    """One split of a dataset recipe: `(image, label)` with `classnames`, `targets`, `samples` (path, label),
    and `name` (the recipe) and `split`."""

    def __init__(self, name: str, split: str, samples, classnames, transform=None, skip_unreadable: bool = False):
        self.name, self.split = name, split
        super().__init__(samples, classnames, transform, skip_unreadable)


def load_benchmark(name: str, root, split: str, transform=None, *, shots: int | None = None, seed: int = 1,
                   classes: str = "all", skip_unreadable: bool = False):
    """One split of a dataset recipe, optionally few-shot and restricted to the base or novel classes.

    With `shots`, the train split holds `shots` images per class and the val split `min(shots, 4)`, drawn as
    CoOp draws them (`coop_few_shot`); ImageNet's val split is its test split, whole, as in CoOp. `classes`
    "base" / "novel" keeps the first / second half of the labels, relabelled from 0 (CoCoOp's
    `subsample_classes`), after the few-shot draw, as CoCoOp.

    Differences from CoOp: the draw is recomputed (deterministically) instead of cached as a pickle; the
    ImageNet family's image files are listed sorted, where CoOp takes the file system's order, so ImageNet's
    draw is reproducible but not CoOp's own (the split-file datasets and FGVC-Aircraft draw CoOp's images).

    Args:
        name: a recipe, in any usual spelling (`benchmark_name`).
        root: the data root holding every dataset's folder (CoOp's `$DATA`).
        split: "train", "val" or "test" (the ImageNet shifts have only "test").
        transform: applied to each PIL image.
        shots: images per class of the train (and val) split; None: all.
        seed: the few-shot draw's seed (CoOp's `--seed`).
        classes: "all", "base" or "novel".
        skip_unreadable: as in `ImageFolderDataset`.

    Raises:
        FileNotFoundError: the dataset folder, its image folder or split file is missing (the message says
            where the recipe expects it; `promptkit data check` lists every problem at once).
        ValueError: an unknown recipe, split or `classes`; a split file of another dataset; class folders that
            do not match the recipe's classes.
    """
    name = benchmark_name(name)
    if split not in splits_of(name):
        raise ValueError(f"{name} has no split {split!r}; its splits: {', '.join(splits_of(name))}")
    if classes not in ("all", "base", "novel"):
        raise ValueError(f"classes must be 'all', 'base' or 'novel', got {classes!r}")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise ValueError(f"shots must be a positive integer or None (all images), got {shots!r}")
    if shots is not None and split == "test":
        raise ValueError("shots apply to the train and val splits; the test split is always whole")
    samples, classnames = read_split(name, root, "test" if split == "val" and _val_is_test(name) else split)
    dataset = BenchmarkDataset(name, split, samples, classnames, transform, skip_unreadable)
    if shots is not None and not (split == "val" and _val_is_test(name)):
        rng = random.Random(seed)
        if split == "val":  # CoOp draws the val images after the train images, from one random stream
            coop_few_shot([label for _, label in read_split(name, root, "train")[0]], shots, rng)
        k = min(shots, VAL_SHOTS) if split == "val" else shots
        dataset = Subset(dataset, coop_few_shot(dataset.targets, k, rng))
    if classes != "all":
        dataset = select_classes(dataset, getattr(base_novel(classnames), classes))
    return dataset


def _val_is_test(name: str) -> bool:
    return RECIPES[name]["kind"] == "imagenet"


def coop_few_shot(targets: Sequence[int], shots: int, rng: random.Random) -> list[int]:
    """Indices of a few-shot draw exactly as Dassl's `generate_fewshot_dataset` (CoOp, CoCoOp, MaPLe, ...):
    classes in order of first appearance, `rng.sample(class members, shots)` per class, a class with fewer
    images kept whole. Seeded with `random.Random(seed)`, as CoOp's `set_random_seed` seeds Python's `random`
    before the train draw (the val draw continues the same stream), this picks CoOp's images from CoOp's
    sample order; CoOp's cached `split_fewshot/shot_K-seed_S.pkl` holds the same draw."""
    members: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        members.setdefault(int(label), []).append(index)
    chosen = []
    for items in members.values():
        chosen += rng.sample(items, shots) if len(items) >= shots else items
    return chosen


# -- reading a recipe's files --------------------------------------------------------------------------
def read_split(name: str, root, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) samples of one split, in the order CoOp reads them, and the class names by label."""
    name = benchmark_name(name)
    recipe, folder = RECIPES[name], dataset_folder(name, root)
    if not folder.is_dir():
        raise FileNotFoundError(f"{recipe['title']} folder {folder} does not exist; put the dataset there "
                                f"({recipe['source']}), or pass the data root that holds {recipe['folder']}/")
    images = folder / recipe["images"]
    if not images.is_dir():
        raise FileNotFoundError(f"{recipe['title']}: image folder {images} does not exist (expected layout: "
                                f"{layout(name)})")
    kind = recipe["kind"]
    if kind == "split_json":
        split_file = folder / recipe["split_file"]
        if not split_file.is_file():
            others = sorted(p.name for p in folder.glob("split_zhou_*.json"))
            hint = f"; {folder} has {', '.join(others)}, the split file of another dataset" if others else ""
            raise FileNotFoundError(f"{recipe['title']}: split file {split_file} does not exist (download it as "
                                    f"CoOp's DATASETS.md says){hint}")
        samples, classnames = _read_split_json(split_file, images, split)
        check_classnames(name, classnames, split_file)
        return samples, classnames
    if kind == "fgvc":
        return _read_fgvc(folder, images, split)
    return _read_folders(name, folder, images, split)


def _read_split_json(split_file: Path, images: Path, split: str):
    try:
        data = json.loads(split_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{split_file} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or any(s not in data for s in SPLITS):
        raise ValueError(f"{split_file} is not a CoOp split file: it needs 'train', 'val' and 'test' lists of "
                         f"[relative path, label, class name]")
    names: dict[int, str] = {}
    for items in data.values():
        for item in items:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[1], int)):
                raise ValueError(f"{split_file}: entry {item!r} is not [relative path, label (int), class name]")
            if names.setdefault(item[1], item[2]) != item[2]:
                raise ValueError(f"{split_file}: label {item[1]} is both {names[item[1]]!r} and {item[2]!r}")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{split_file}: labels must be 0..{len(names) - 1} without gaps")
    # `Apply_Eye_Makeup`, `american_bulldog`: read as spaces, as CoOp's learners do.
    return ([(images / rel, label) for rel, label, _ in data[split]],
            [names[i].replace("_", " ") for i in range(len(names))])


def _read_fgvc(folder: Path, images: Path, split: str):
    files = [folder / "variants.txt", folder / f"images_variant_{split}.txt"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"FGVCAircraft: {', '.join(missing)} missing; keep the data/ folder of "
                                f"fgvc-aircraft-2013b whole (renamed fgvc_aircraft)")
    classnames = [line.strip() for line in files[0].read_text().splitlines() if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    samples = []
    for line in files[1].read_text().splitlines():
        if not line.strip():
            continue
        image, _, variant = line.strip().partition(" ")
        if variant not in label_of:
            raise ValueError(f"{files[1]}: variant {variant!r} of image {image} is not in variants.txt")
        samples.append((images / f"{image}.jpg", label_of[variant]))
    return samples, classnames


def imagenet_classnames(folder: Path) -> list[str]:
    """CLIP's 1,000 ImageNet class names, or those of CoOp's `classnames.txt` in `folder` when there is one
    ("<wnid> <name>" per line, in WordNet-id order); the two names CLIP gives twice are made distinct
    (`distinct_names` of the recipe: learners refuse two classes with one name)."""
    text_file = folder / "classnames.txt"
    names = list(IMAGENET_NAMES) if not text_file.is_file() else _read_classnames_txt(text_file)
    for index, name in RECIPES["imagenet"]["distinct_names"].items():
        names[int(index)] = name
    return names


def _read_classnames_txt(text_file: Path) -> list[str]:
    pairs = [line.strip().partition(" ") for line in text_file.read_text().splitlines() if line.strip()]
    wnids = [wnid for wnid, _, _ in pairs]
    if wnids != IMAGENET_WNIDS:
        raise ValueError(f"{text_file} does not list the 1,000 ImageNet WordNet ids in order ({len(wnids)} lines); "
                         f"use CoOp's classnames.txt or delete it (promptkit ships the same names)")
    return [name for _, _, name in pairs]


def class_indices(name: str) -> list[int]:
    """Which of the 1,000 ImageNet classes an ImageNet-family recipe has, in label order."""
    subset = RECIPES[benchmark_name(name)]["classes"]
    return list(range(1000)) if subset == "imagenet" else list(CLASSES[subset])


def _read_folders(name: str, folder: Path, images: Path, split: str):
    recipe, kind = RECIPES[name], RECIPES[name]["kind"]
    indices = class_indices(name)
    names = imagenet_classnames(folder)
    classnames = [names[i] for i in indices]
    if kind == "index_folders":  # ImageNet-V2 names its class folders by ImageNet label
        expected = [str(i) for i in indices]
    else:
        expected = [IMAGENET_WNIDS[i] for i in indices]
        if kind == "imagenet":
            images = images / ("train" if split == "train" else "val")
            if not images.is_dir():
                raise FileNotFoundError(f"ImageNet: {images} does not exist (expected layout: {layout(name)})")
    found = {p.name for p in images.iterdir() if p.is_dir() and _visible(p)}
    missing, extra = [e for e in expected if e not in found], sorted(found - set(expected))
    if missing or extra:
        hint = ""
        if extra and kind == "wnid_folders":
            other = [k for k in ("imagenet_a", "imagenet_r", "imagenet_sketch") if k != name and
                     {IMAGENET_WNIDS[i] for i in class_indices(k)} >= found]
            hint = f"; the folders are those of {RECIPES[other[0]]['title']}" if other else ""
        raise ValueError(f"{recipe['title']}: {images} must hold one folder per class, {len(expected)} in all; "
                         + (f"missing {len(missing)} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                            if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"{len(extra)} not of this dataset ({', '.join(extra[:5])})" if extra else "") + hint)
    samples = []
    for label, entry in enumerate(expected):
        # Sorted file names; CoOp lists them in the file system's order, which only changes the few-shot draw.
        samples += [(p, label) for p in sorted((images / entry).iterdir())
                    if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p)]
    return samples, classnames


def check_classnames(name: str, classnames: Sequence[str], where) -> None:
    """Refuses a split file whose class names are mostly not the recipe's (a split file of another dataset)."""
    def norm(text):
        return _key(text.replace("_", " "))

    known = {norm(c) for c in CLASSES[RECIPES[name]["classes"]]}
    ours = [norm(c) for c in classnames]
    if sum(c in known for c in ours) * 2 >= len(ours):
        return
    best = max((k for k in RECIPES if RECIPES[k]["kind"] == "split_json"),
               key=lambda k: sum(c in {norm(x) for x in CLASSES[RECIPES[k]["classes"]]} for c in ours))
    raise ValueError(f"{where} is not {RECIPES[name]['title']}'s split file: its classes ({', '.join(classnames[:3])}, "
                     f"...) are {RECIPES[best]['title']}'s; put {RECIPES[name]['split_file']} of CoOp's DATASETS.md "
                     f"there")


def layout(name: str) -> str:
    """The folder layout a recipe expects under the data root, in one line."""
    recipe = RECIPES[benchmark_name(name)]
    base, kind = recipe["folder"], recipe["kind"]
    images = f"{base}/{recipe['images']}/" if recipe["images"] else f"{base}/"
    if kind == "split_json":
        return f"{images} (the split file's paths start here), {base}/{recipe['split_file']}"
    if kind == "fgvc":
        return f"{images}<id>.jpg, {base}/variants.txt, {base}/images_variant_{{train,val,test}}.txt"
    if kind == "imagenet":
        return f"{images}train/<wnid>/*.JPEG, {images}val/<wnid>/*.JPEG, optional {base}/classnames.txt"
    if kind == "index_folders":
        return f"{images}<0..999>/*.jpeg"
    return f"{images}<wnid>/* ({len(class_indices(name))} class folders)"


# -- checking a folder against its recipe ------------------------------------------------------------------
@dataclass
class CheckReport:
    """What `check_benchmark` found: `problems` (the dataset cannot be used as is, each says what to fix),
    `notes` (differences from the published split sizes) and `counts` (images per split)."""

    name: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    n_classes: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def check_benchmark(name: str, root, verify_images: bool = True) -> CheckReport:
    """Checks a dataset folder against its recipe: the folders and split files exist, every listed image
    exists (and with `verify_images` opens with PIL), the class folders match, and the split sizes are the
    published ones (a difference is a note: it usually means another version of the split file).

    Args:
        name: a recipe, in any usual spelling.
        root: the data root (CoOp's `$DATA`).
        verify_images: open every image (slow on full datasets; checks for truncated or non-image files).
    """
    from PIL import Image, UnidentifiedImageError

    name = benchmark_name(name)
    recipe, report = RECIPES[name], CheckReport(name)
    for split in splits_of(name):
        try:
            samples, classnames = read_split(name, root, split)
        except (FileNotFoundError, ValueError) as err:
            message = str(err)
            if message not in report.problems:
                report.problems.append(message)
            continue
        report.n_classes = len(classnames)
        report.counts[split] = len(samples)
        missing = [str(p) for p, _ in samples if not p.is_file()]
        if missing:
            report.problems.append(f"{split}: {len(missing)} of {len(samples)} listed images do not exist, e.g. "
                                   f"{missing[0]}; the image folder must be {layout(name)}")
        if verify_images:
            bad = []
            for path, _ in samples:
                if path.is_file():
                    try:
                        with Image.open(path) as image:
                            image.verify()
                    except (OSError, UnidentifiedImageError):
                        bad.append(str(path))
            if bad:
                report.problems.append(f"{split}: {len(bad)} images cannot be read, e.g. {bad[0]}; download them "
                                       f"again, or train with --skip-unreadable")
        published = recipe["sizes"].get("test" if split == "val" and _val_is_test(name) else split)
        if published is not None and published != len(samples):
            report.notes.append(f"{split}: {len(samples)} images, published {published}")
    expected = len(class_indices(name)) if recipe["kind"] not in ("split_json", "fgvc") else len(
        CLASSES[recipe["classes"]])
    if report.n_classes is not None and report.n_classes != expected:
        report.notes.append(f"{report.n_classes} classes, published {expected}")
    return report

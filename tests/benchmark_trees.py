"""Fake dataset trees in the exact layouts of CoOp's DATASETS.md: tiny images, split files in CoOp's format.

Split-file datasets get the first `n_classes` class names of the recipe's shipped list; the ImageNet family
gets every class folder of its recipe (1,000 or 200), one image each (hard links to one file, so it is fast).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from promptkit.data.benchmarks import CLASSES, IMAGENET_NAMES, IMAGENET_WNIDS, RECIPES, class_indices


def _image(path: Path, label: int, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a class colour with a little per-image variation: learnable, and every file differs
    colour = ((label * 67) % 256, (label * 131 + 40) % 256, (index * 29 + label * 7) % 256)
    Image.new("RGB", (8, 8), colour).save(path)


def _split_path(name: str, classname: str, label: int, i: int) -> str:
    """A relative path shaped as the real split file's."""
    folder = classname.replace(" ", "_").replace("/", "_")
    if name == "stanford_cars":
        return f"cars_{'test' if i % 2 else 'train'}/{label:03d}{i:04d}.jpg"
    if name == "oxford_pets":
        return f"{folder}_{i}.jpg"
    if name == "oxford_flowers":
        return f"image_{label:03d}{i:02d}.jpg"
    return f"{folder}/{folder}_{i:04d}.jpg"


def make_tree(root, name: str, n_classes: int = 4, per_split=(5, 2, 3)) -> Path:
    """Writes the fake tree of recipe `name` under data root `root`; returns the dataset folder."""
    recipe = RECIPES[name]
    folder = Path(root) / recipe["folder"]
    images = folder / recipe["images"]
    kind = recipe["kind"]
    if kind == "split_json":
        names = CLASSES[recipe["classes"]][:n_classes]
        split, i = {}, 0
        for s, count in zip(("train", "val", "test"), per_split):
            split[s] = []
            for label, classname in enumerate(names):
                for _ in range(count + label % 2):  # unequal class sizes
                    rel = _split_path(name, classname, label, i)
                    _image(images / rel, label, i)
                    split[s].append([rel, label, classname])
                    i += 1
        folder.mkdir(parents=True, exist_ok=True)
        (folder / recipe["split_file"]).write_text(json.dumps(split))
    elif kind == "fgvc":
        names = CLASSES[recipe["classes"]][:n_classes]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "variants.txt").write_text("".join(f"{n}\n" for n in names))
        i = 1000000
        for s, count in zip(("train", "val", "test"), per_split):
            lines = []
            for label, classname in enumerate(names):
                for _ in range(count):
                    _image(images / f"{i}.jpg", label, i)
                    lines.append(f"{i} {classname}\n")
                    i += 1
            (folder / f"images_variant_{s}.txt").write_text("".join(lines))
    else:
        one = folder / "_one.png"
        _image(one, 0, 0)
        subdirs = {"imagenet": ["train", "val"]}.get(kind, [""])
        for sub in subdirs:
            for index in class_indices(name):
                entry = str(index) if kind == "index_folders" else IMAGENET_WNIDS[index]
                target = images / sub / entry
                target.mkdir(parents=True, exist_ok=True)
                for j in range(2 if sub == "train" else 1):
                    os.link(one, target / f"{entry}_{j}.png")
        one.unlink()
        if kind == "imagenet":
            (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(IMAGENET_WNIDS,
                                                                                             IMAGENET_NAMES)))
    return folder

"""Each method's training recipe as its authors ran it, shipped as data (`recipes.json`, every entry with the
config files and scripts it comes from).

A recipe is what one protocol of a paper trains with: optimizer, learning rate, batch, epochs (by shot count
where the authors vary them), warm-up, schedule, precision, the training augmentation and the method keywords
that differ from the learner's defaults. Protocols: "few-shot" (all classes, K shots), "base2novel" (train on
the base half of the classes), "cross-dataset" (train on ImageNet, test elsewhere), "domainbed"
(train on source domains, test on an unseen one; DPL) and "unsupervised" (a target set's unlabelled images: POUF,
self-learning). Not every paper publishes every protocol; asking for a missing one says which exist. Recipes
trained on every image of a set list no shot count.

One departure from the authors' runs: learners whose image path carries no prompt encode each training image
once per cached pass (`TrainConfig.cache_passes`) instead of once per epoch, so a recipe with augmentation
caches `CACHE_PASSES` augmented passes and epoch e uses pass e mod `CACHE_PASSES`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources

from .templates import dataset_name
from .training.config import TrainConfig

PROTOCOLS = ("few-shot", "base2novel", "cross-dataset", "domainbed", "unsupervised")
# Tip-Adapter's 10 "augment epochs": enough crops per image for a few-shot run, 10 encoder passes at the start.
CACHE_PASSES = 10
# The TrainConfig fields a recipe sets besides epochs and augmentation.
_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "warmup_epochs", "warmup_lr", "scheduler",
           "precision")
_DATA = json.loads(resources.files(__package__).joinpath("recipes.json").read_text())


@dataclass(frozen=True)
class Recipe:
    """One paper's training recipe for one protocol, shot count and dataset.

    Attributes:
        config: the `TrainConfig` (its `recipe` field names this recipe, its `augment` the transform).
        method_kwargs: learner keywords the recipe sets (only those that differ from the learner's defaults).
        transform: keywords of `promptkit.data.train_transform` for the training images.
        source: the authors' files the values come from.
        notes: what the recipe leaves open or promptkit cannot express; empty when nothing.
    """

    config: TrainConfig
    method_kwargs: dict
    transform: dict
    source: str
    notes: str


def list_recipes() -> dict[str, list[str]]:
    """Method name -> the protocols with a published recipe (methods without any, e.g. zeroshot, are left out)."""
    out = {method: [p for p in PROTOCOLS if p in entries] for method, entries in _DATA.items()
           if not method.startswith("_")}
    return {method: protocols for method, protocols in out.items() if protocols}


def get_recipe(method: str, protocol: str = "few-shot", shots: int | None = 16,
               dataset: str | None = None) -> Recipe:
    """The training recipe of `method`'s paper for `protocol`.

    Args:
        method: a registered method name, e.g. "maple".
        protocol: "few-shot", "base2novel", "cross-dataset", "domainbed" or "unsupervised".
        shots: training images per class (None: all). Where the epochs depend on the shot count, a count the
            authors did not run takes the value of the nearest smaller one they did (the notes say so).
        dataset: the dataset in any usual spelling ("stanford_cars", "dtd", "imagenet"), for recipes whose
            values differ per dataset.

    Raises:
        ValueError: unknown method or protocol, a protocol the paper published no recipe for (the message
            names those it did), or `shots` below 1.
        KeyError: an unknown dataset name.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise ValueError(f"shots must be a positive integer or None (all images), got {shots!r}")
    key = method.lower()
    entries = None if key.startswith("_") else _DATA.get(key)
    if entries is None:
        raise ValueError(f"no recipe for method {method!r}; recipes exist for: {', '.join(list_recipes())}")
    if "_none" in entries:
        raise ValueError(f"{key} has no training recipe: {entries['_none']}")
    if protocol not in entries:
        why = entries.get("_unpublished", {}).get(protocol, "not published")
        raise ValueError(f"{key} has no {protocol} recipe ({why}); its recipes: {', '.join(list_recipes()[key])}")
    entry = copy.deepcopy(entries[protocol])  # the caller may change what it gets
    notes = [entry["notes"]] if entry["notes"] else []
    name = f"{key}/{protocol}/{'all' if shots is None else shots}-shot"
    if dataset is not None:
        dataset = dataset_name(dataset)
        name += f"/{dataset}"
        override = entry.get("datasets", {}).get(dataset, {})
        if shots in override.get("when_shots", [shots]):
            entry.update({k: v for k, v in override.items() if k not in ("method_kwargs", "when_shots")})
            entry["method_kwargs"] = {**entry["method_kwargs"], **override.get("method_kwargs", {})}
    elif entry.get("datasets"):
        notes.append(f"Values differ for {', '.join(entry['datasets'])}: name the dataset to get them.")
    asked = "all images" if shots is None else f"{shots} shots"
    epochs = entry["epochs"]
    if isinstance(epochs, dict):
        published = sorted(int(k) for k in epochs)
        # Step-wise, as CoOp's rule (1 shot: 50, 2-4: 100, 8-16: 200): the nearest published count below.
        at = max([k for k in published if shots is None or k <= shots], default=published[0])
        epochs = epochs[str(at)]
        if at != shots:
            notes.append(f"Epochs are published for {', '.join(map(str, published))} shots; {asked} take the "
                         f"{at}-shot value.")
    elif not entry["shots"]:
        if shots is not None:
            notes.append(f"The authors trained on every image of the set, not {shots} per class.")
    elif shots not in entry["shots"]:
        notes.append(f"The authors trained this with {', '.join(map(str, entry['shots']))} shots; {asked} use the "
                     f"same values.")
    augment = entry["augment"]
    config = TrainConfig(**{k: entry[k] for k in _FIELDS}, epochs=epochs, augment=augment, recipe=name,
                         cache_passes=CACHE_PASSES if augment else TrainConfig.cache_passes,
                         param_groups=entry.get("param_groups"))
    return Recipe(config=config, method_kwargs=entry["method_kwargs"], transform=copy.deepcopy(augment or {}),
                  source=entry["_source"], notes=" ".join(notes))

"""The authors' per-dataset settings of the test-time adapters, shipped as data (`defaults.json`, with the
scripts and configs each value comes from), selected by dataset name.

Without a dataset name the adapters' own defaults apply: TPT picks crops for label sets of >= 200 classes
and AugMix otherwise; C-TPT uses AugMix and lambda 20 (>= 200 classes) or 50; TDA uses its ImageNet
configuration with one view; Zero uses 64 crop views. The class count cannot tell ImageNet (C-TPT: lambda 50,
crops) from ImageNet-V2 or -Sketch (lambda 20, AugMix), so name the dataset to get the published runs.
"""
from __future__ import annotations

import json
from importlib import resources

from ..templates import IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_7, dataset_name, dataset_template

_DATA = json.loads(resources.files(__package__).joinpath("defaults.json").read_text())


def adapter_defaults(adapter: str, dataset: str | None) -> dict:
    """Keyword arguments of `adapter` ("tpt", "ctpt", "tda", "zero") in the authors' run on `dataset`."""
    if dataset is None:
        return {}
    settings = dict(_DATA.get(adapter, {}).get(dataset_name(dataset), {}))
    settings.pop("templates", None)
    return settings


def classifier_templates(adapter: str, dataset: str | None) -> tuple[str, ...]:
    """The hand-crafted templates of the zero-shot classifier the authors adapt on `dataset`: TDA's per-dataset
    sets (7 or 80 templates, or CoOp's one), "a photo of a {}." for the others (TPT, C-TPT and Zero tune or vote
    on that prompt)."""
    spec = _DATA.get(adapter, {}).get(dataset_name(dataset), {}).get("templates") if dataset else None
    if spec == "imagenet_7":
        return IMAGENET_TEMPLATES_7
    if spec == "imagenet":
        return IMAGENET_TEMPLATES
    if spec == "coop":
        return (dataset_template(dataset, "coop"),)
    return ("a photo of a {}.",)

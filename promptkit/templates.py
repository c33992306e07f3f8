"""Hand-crafted prompt templates, shipped as package data (`templates.json`).

- `IMAGENET_TEMPLATES`: CLIP's 80 ImageNet templates; `IMAGENET_TEMPLATES_7`: the 7 CLIP found best.
- `COOP_TEMPLATES`: CoOp's single template per dataset (keys are CoOp's dataset names).
"""
from __future__ import annotations

import json
from importlib import resources

_DATA = json.loads(resources.files(__package__).joinpath("templates.json").read_text())
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(_DATA["imagenet"])
IMAGENET_TEMPLATES_7: tuple[str, ...] = tuple(_DATA["imagenet_7"])
COOP_TEMPLATES: dict[str, str] = dict(_DATA["coop"])


def get_templates(name: str) -> tuple[str, ...]:
    """"imagenet" (80), "imagenet_7", or a CoOp dataset name (one template)."""
    if name == "imagenet":
        return IMAGENET_TEMPLATES
    if name == "imagenet_7":
        return IMAGENET_TEMPLATES_7
    if name in COOP_TEMPLATES:
        return (COOP_TEMPLATES[name],)
    raise KeyError(f"unknown template set {name!r}; use 'imagenet', 'imagenet_7' or one of {sorted(COOP_TEMPLATES)}")

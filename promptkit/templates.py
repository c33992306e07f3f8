"""Hand-crafted prompt templates, shipped as package data (`templates.json`, with the file each table comes from).

- `IMAGENET_TEMPLATES`: CLIP's 80 ImageNet templates; `IMAGENET_TEMPLATES_7`: the 7 CLIP found best.
- `PROMPTSRC_TEMPLATES`: the 60 PromptSRC averages for its frozen text target, on every dataset.
- Per-dataset tables, one template per dataset (keys are Dassl's dataset names): `COOP_TEMPLATES` (CoOp's
  zero-shot CLIP, also used by DPT/CAVPT), and KgCoOp's and ProGrad's own tables, which differ for some
  datasets (e.g. DTD). `dataset_template(dataset, method)` picks one.
"""
from __future__ import annotations

import json
import re
from importlib import resources

_DATA = json.loads(resources.files(__package__).joinpath("templates.json").read_text())
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(_DATA["imagenet"])
IMAGENET_TEMPLATES_7: tuple[str, ...] = tuple(_DATA["imagenet_7"])
PROMPTSRC_TEMPLATES: tuple[str, ...] = tuple(_DATA["promptsrc"])
COOP_TEMPLATES: dict[str, str] = dict(_DATA["coop"])
DATASET_TEMPLATES: dict[str, dict[str, str]] = {m: dict(_DATA[m]) for m in ("coop", "kgcoop", "prograd")}

# Other spellings of Dassl's dataset names (compared lower-case, without '_', '-' and spaces).
_ALIASES = {"dtd": "DescribableTextures", "pets": "OxfordPets", "flowers": "OxfordFlowers",
            "flowers102": "OxfordFlowers", "oxfordflowers102": "OxfordFlowers", "cars": "StanfordCars",
            "aircraft": "FGVCAircraft", "fgvc": "FGVCAircraft", "caltech": "Caltech101", "food": "Food101",
            "ucf": "UCF101", "sun": "SUN397", "imagenetk": "ImageNetSketch", "imagenets": "ImageNetSketch"}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


_NAMES = {**{_key(k): k for k in COOP_TEMPLATES}, **_ALIASES}


def dataset_name(name: str) -> str:
    """Dassl's name of a dataset given in any usual spelling ("oxford_pets", "dtd", "ImageNet-A", ...)."""
    found = _NAMES.get(_key(name))
    if found is None:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(COOP_TEMPLATES))} "
                       f"(any case, '_' or '-' allowed; e.g. 'oxford_pets', 'dtd', 'imagenet_a')")
    return found


def dataset_template(dataset: str | None, method: str = "coop") -> str:
    """The one hand-crafted template `method` ("coop", "kgcoop" or "prograd") uses for `dataset`;
    "a photo of a {}." when no dataset is named."""
    if dataset is None:
        return "a photo of a {}."
    if method not in DATASET_TEMPLATES:
        raise KeyError(f"no per-dataset template table for {method!r}; tables: {sorted(DATASET_TEMPLATES)}")
    return DATASET_TEMPLATES[method][dataset_name(dataset)]


def get_templates(name: str) -> tuple[str, ...]:
    """"imagenet" (80), "imagenet_7", "promptsrc" (60), or a dataset name (CoOp's one template)."""
    sets = {"imagenet": IMAGENET_TEMPLATES, "imagenet_7": IMAGENET_TEMPLATES_7, "promptsrc": PROMPTSRC_TEMPLATES}
    if name in sets:
        return sets[name]
    try:
        return (dataset_template(name, "coop"),)
    except KeyError:
        raise KeyError(f"unknown template set {name!r}; use one of {sorted(sets)} or a dataset name "
                       f"({', '.join(sorted(COOP_TEMPLATES))})") from None

"""TrainConfig: every knob of the shared trainer, with CoOp's recipe as the defaults."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

# Keywords of `promptkit.data.train_transform` (kept here so a config is checked without importing torchvision).
AUGMENT_KEYS = ("crop_scale", "flip", "interpolation")


@dataclass
class TrainConfig:
    """Training settings. Defaults reproduce CoOp (Zhou et al.): SGD lr 0.002, momentum 0.9, weight
    decay 5e-4, cosine schedule over `epochs` after 1 constant warm-up epoch at 1e-5, batch 32.

    Attributes:
        epochs: training epochs (CoOp: 50 for 1 shot, 100 for 2-4, 200 for 8-16; ImageNet 50).
        batch_size: global batch; under torchrun it is split evenly across ranks.
        optimizer: "sgd" or "adamw".
        scheduler: "cosine" or "constant"; the learning rate is a pure function of the epoch.
        warmup_epochs, warmup_lr: CoOp's constant warm-up.
        precision: "fp32", "bf16" or "fp16" autocast (CUDA); fp16 uses a GradScaler.
        grad_accum_steps: micro-batches per optimizer step (the batch is split into them).
        grad_clip: max gradient norm, or None.
        seed: data order and all randomness of epoch e are a pure function of (seed, e).
        output_dir: where checkpoints, logs and final prompts go; None writes nothing.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        log_every: optimizer steps between log lines (0: only per epoch).
        eval_every, checkpoint_every: in epochs (0: only at the end).
        cache_image_features: "auto" encodes each training image once when the learner's image
            path carries no prompt (exact without random augmentation). With a random augmenting
            transform, set `cache_passes` = k: k augmented passes are cached and epoch e uses pass e mod k
            (Tip-Adapter's "augment epochs").
        nan_policy: "error" stops on a non-finite loss keeping the last checkpoint; "skip" skips the step.
        ece_bins: bins of the expected calibration error.
        augment: the training augmentation the settings were chosen for, as keywords of
            `promptkit.data.train_transform` (e.g. {"crop_scale": [0.08, 1.0], "flip": true, "interpolation":
            "bicubic"}). The dataset carries its transform, so this is a record: the trainer warns when it is set
            and the training data's transform has no random op.
        param_groups: prompts trained with their own settings, by parameter-name prefix: e.g. {"ctx": {"lr":
            0.002, "warmup_epochs": 1}} (DPT trains its text context so, beside the visual prompts at `lr`). Keys
            of each: lr, warmup_epochs, warmup_lr, weight_decay.
        recipe: the recipe these settings came from (`promptkit.recipes`), e.g. "maple/base2novel/16-shot";
            recorded in config.json.

    `TrainConfig.for_method("maple", protocol="base2novel")` gives a paper's recipe.
    """

    epochs: int = 50
    batch_size: int = 32
    lr: float = 0.002
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: str = "fp32"
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    seed: int = 1
    output_dir: str | None = "runs/promptkit"
    num_workers: int = 0
    device: str = "auto"
    log_every: int = 20
    eval_every: int = 1
    checkpoint_every: int = 1
    cache_image_features: str | bool = "auto"
    cache_passes: int = 1
    nan_policy: str = "error"
    ece_bins: int = 15
    eval_batch_size: int = 256
    progress: bool = True
    augment: dict | None = None
    recipe: str | None = None
    param_groups: dict | None = None

    def __post_init__(self):
        choices = {"optimizer": ("sgd", "adamw"), "scheduler": ("cosine", "constant"),
                   "precision": ("fp32", "bf16", "fp16"), "nan_policy": ("error", "skip"),
                   "cache_image_features": ("auto", True, False)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "grad_accum_steps", "cache_passes", "ece_bins", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum_steps {self.grad_accum_steps}")
        for prefix, group in (self.param_groups or {}).items():
            unknown = set(group) - {"lr", "warmup_epochs", "warmup_lr", "weight_decay"}
            if unknown:
                raise ValueError(f"TrainConfig.param_groups[{prefix!r}] has unknown keys {sorted(unknown)}; allowed: "
                                 f"lr, warmup_epochs, warmup_lr, weight_decay")
        if self.augment is not None and not set(self.augment) <= set(AUGMENT_KEYS):
            raise ValueError(f"TrainConfig.augment has unknown keys {sorted(set(self.augment) - set(AUGMENT_KEYS))}; "
                             f"allowed: {', '.join(AUGMENT_KEYS)}")

    @classmethod
    def for_method(cls, name: str, shots: int | None = 16, protocol: str = "few-shot",
                   dataset: str | None = None) -> "TrainConfig":
        """The settings of `name`'s published recipe (`promptkit.recipes.get_recipe`, which also gives the
        method keywords and the training transform)."""
        from ..recipes import get_recipe

        return get_recipe(name, protocol, shots, dataset).config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        """Writes JSON, or YAML when the file name ends in .yaml/.yml."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            yaml = _yaml()
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        data = _yaml().safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        return cls.from_dict(data or {})

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def with_overrides(self, items: Sequence[str]) -> "TrainConfig":
        """Applies `key=value` strings (values parsed as JSON when possible, e.g. lr=0.01, grad_clip=null)."""
        data = self.to_dict()
        data.update(parse_overrides(items))
        return self.from_dict(data)


def parse_overrides(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _yaml():
    try:
        import yaml
    except ImportError as err:
        raise ValueError("YAML configs need PyYAML: pip install 'clip-promptkit[yaml]' (or use JSON)") from err
    return yaml

"""`promptkit train` and `promptkit eval` (also the data and model options `promptkit tta` shares)."""
from __future__ import annotations

import argparse
import collections.abc
import difflib
import inspect
import json
import os
import shutil
import types
import typing
import warnings
from pathlib import Path

from ..recipes import PROTOCOLS, get_recipe
from ..training.config import TrainConfig, _yaml, parse_overrides

# TrainConfig fields the CLI sets from its own flags; as key=value they would be silently replaced.
FLAG_FIELDS = {"seed": "--seed", "output_dir": "--out", "device": "--device"}
# What a training run writes into --out: a directory holding any of these already holds a run.
RUN_FILES = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "prompts", "metrics.csv", "metrics.jsonl",
             "train.log", "config.json", "tensorboard")


def add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="promptkit-tiny", help="open_clip architecture (default: promptkit-tiny)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file")
    parser.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                        help="build the model with QuickGELU, as OpenAI's weights need (default: from the "
                             "pretrained tag, or detected for a local OpenAI checkpoint)")
    parser.add_argument("--cache-dir", default=None, help="open_clip's download cache")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    parser.add_argument("--data", required=True,
                        help="image folder (root/<class>/<images>), the image root of --split-json, or 'procedural'")
    parser.add_argument("--split-json", default=None, help="CoOp split file (split_zhou_*.json)")
    parser.add_argument("--classes", default="all", choices=["all", "base", "novel"], help="base-to-novel subset")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="check every image file first and skip those that cannot be read")


def add_load_args(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--load", default=None, help=f"save_pretrained directory (default: {default_help})")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="load --load prompts on a different base model when the tensor shapes still fit")


def load_model(args, device: str | None = None):
    from ..clip import load_clip
    from . import distributed

    device = _device(args.device or device)
    if distributed.world_size() > 1 and device == "cuda":  # torchrun: one GPU per local rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return load_clip(args.arch, args.pretrained, device=device, precision=args.precision, cache_dir=args.cache_dir,
                     quick_gelu=args.quick_gelu)


def _device(name: str | None) -> str:
    import torch

    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or not available.get(device.type):
        usable = ", ".join(k for k, ok in available.items() if ok) + (", cuda:N" if available["cuda"] else "")
        problem = "is not a device name" if device is None else "is not available on this machine"
        raise ValueError(f"--device {name} {problem}; use one of: {usable}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has CUDA devices cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return name


def load_split(args, clip, split: str, shots: int | None = None, seed: int = 1, photos: bool = False,
               allow_fewer: bool = False, transform=None):
    """The dataset for `split` ("train", "val", "test"; "shifted" for the procedural benchmark); image
    files come through `transform` (default: `clip.preprocess`), or as PIL images with `photos`."""
    from ..data import CoOpSplitDataset, ImageFolderDataset, ProceduralBenchmark, few_shot

    if args.data == "procedural":
        ignored = [flag for flag, given in (("--split-json", args.split_json), ("--skip-unreadable", args.skip_unreadable),
                                            ("--allow-fewer", allow_fewer)) if given]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: for image files only, not --data procedural")
        return ProceduralBenchmark().split(split, shots=shots, seed=seed, classes=args.classes)
    transform = None if photos else transform or clip.preprocess
    if args.split_json:
        dataset = CoOpSplitDataset(args.data, args.split_json, split, transform=transform,
                                   skip_unreadable=args.skip_unreadable)
    else:
        dataset = ImageFolderDataset(args.data, transform=transform, skip_unreadable=args.skip_unreadable)
    dataset = _classes(args, dataset)
    return few_shot(dataset, shots, seed, allow_fewer=allow_fewer) if shots else dataset


def has_splits(args) -> bool:
    """Whether --data has named splits; an image folder is one split, so --split would be ignored."""
    if args.split_json or args.data == "procedural":
        return True
    if getattr(args, "split", None):
        raise ValueError(f"--split {args.split}: an image folder is one split; --split needs --split-json or "
                         f"--data procedural")
    return False


def _shots(text: str) -> int | str:
    if text == "all":
        return "all"  # told apart from "not given" (None) until `run` reads it
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {text!r}")
    return int(text)


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_and_data_args(parser)
    if command == "train":
        parser.add_argument("--method", default="coop", help="a registered method (promptkit list-methods)")
        parser.add_argument("--shots", type=_shots, default=None,
                            help="training images per class, or 'all' (image files only; default 16, with "
                                 "--unlabeled all)")
        parser.add_argument("--unlabeled", action="store_true",
                            help="train on the images of --train-split without reading their labels (methods whose "
                                 "objectives need none: pouf, self-learning); validation still uses labels")
        parser.add_argument("--train-split", default="train",
                            help="the split trained on (default train; e.g. shifted for --data procedural)")
        parser.add_argument("--allow-fewer", action="store_true",
                            help="take every image of a class that has fewer than --shots")
        parser.add_argument("--seed", type=int, default=None, help="few-shot sampling and training seed "
                                                                   "(default: --config's, else 1)")
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--protocol", default=None, choices=PROTOCOLS,
                            help="which of the method's published recipes to train with (default: base2novel with "
                                 "--classes base, else few-shot)")
        parser.add_argument("--recipe", default="paper", choices=["paper", "none"],
                            help="paper: the method's published recipe (promptkit.recipes) under --config and "
                                 "key=value; none: TrainConfig's plain defaults")
        parser.add_argument("--dataset", default=None,
                            help="the benchmark trained on (e.g. oxford_pets, dtd, imagenet): per-dataset recipe "
                                 "values, and the method's per-dataset templates where it has them")
        parser.add_argument("--config", default=None, help="TrainConfig as JSON or YAML (over the recipe)")
        parser.add_argument("--init-from", default=None, metavar="DIR",
                            help="start the prompts from a save_pretrained directory of the same method and prompt "
                                 "keywords (MVLPT's target from its multi-task source; class names may differ)")
        parser.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint")
        parser.add_argument("--overwrite", action="store_true", help="delete the run already in OUT first")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="TrainConfig fields or method keywords, e.g. epochs=10 n_ctx=4")
    else:
        add_load_args(parser, "zero-shot")
        parser.add_argument("--split", default=None, help="test (default), val or train; with --split-json or "
                                                          "procedural data (an image folder is one split)")
        parser.add_argument("--batch-size", type=int, default=256)
        parser.add_argument("--attack", default=None, choices=["pgd"],
                            help="also report top-1 under this attack (robust_top1): L-inf PGD on pixels in [0, 1]")
        parser.add_argument("--eps", default="1/255", help="attack radius on pixels in [0, 1], e.g. 1/255 or 0.004 "
                                                           "(default 1/255)")
        parser.add_argument("--steps", type=int, default=100, help="attack steps (default 100)")
        parser.add_argument("--step-size", default="1/255", help="attack step on pixels in [0, 1] (default 1/255)")
        parser.add_argument("--attack-seed", type=int, default=0, help="seed of the attack's random start")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_pretrained
    from ..data import train_transform
    from ..registry import METHODS, create_learner
    from .trainer import PromptTrainer

    if args.command == "eval":
        splits = has_splits(args)
        clip = load_model(args)
        dataset = load_split(args, clip, args.split or "test") if splits else _folder(args, clip)
        learner = (load_pretrained(args.load, clip, strict=args.strict, classnames=dataset.classnames) if args.load
                   else create_learner("zeroshot", clip, dataset.classnames))
        attack = {}
        if args.attack:
            from ..attacks import parse_budget

            attack = dict(attack=args.attack, eps=parse_budget(args.eps), steps=args.steps,
                          step_size=parse_budget(args.step_size), seed=args.attack_seed)
        metrics = PromptTrainer(learner, TrainConfig(output_dir=None, eval_batch_size=args.batch_size,
                                                     device=str(clip.device))).evaluate(dataset, **attack)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()
                          if k != "per_class"}))
        return 0
    # Every mistake in the settings is reported before the model, the data or --out is touched.
    if args.unlabeled and args.shots not in (None, "all"):
        raise ValueError("--unlabeled trains on every image of --train-split: --shots would pick images per class "
                         "by their labels; leave it out")
    if not args.unlabeled and args.shots is None:
        args.shots = 16
    if args.shots == "all":
        args.shots = None
    if args.data == "procedural" and args.shots is None and not args.unlabeled:
        raise ValueError("--shots all needs image files; the procedural benchmark renders --shots N per class")
    old_run = _existing_run(args)
    file_data = _read_config(args.config) if args.config else {}
    train_keys, method_keys = _split_overrides(parse_overrides(args.overrides), args.method)
    recipe, recipe_keys, recipe_line = _recipe(args)
    method_keys = {**recipe_keys, **method_keys}
    if args.dataset and "dataset" in keyword_types(METHODS.get(args.method)):
        method_keys.setdefault("dataset", args.dataset)  # the method's per-dataset templates
    if file_data.get("output_dir", args.out) != args.out:
        warnings.warn(f"--config's output_dir {file_data['output_dir']!r} is replaced by --out {args.out}")
    seed = args.seed if args.seed is not None else file_data.get("seed", TrainConfig.seed)
    clip = load_model(args, device=file_data.get("device"))
    config = TrainConfig.from_dict({**recipe, **file_data, **train_keys, "seed": seed, "output_dir": args.out,
                                    "device": str(clip.device)})
    transform = train_transform(clip, **config.augment) if config.augment and args.data != "procedural" else None
    train = load_split(args, clip, args.train_split, shots=args.shots, seed=seed, allow_fewer=args.allow_fewer,
                       transform=transform)
    if args.unlabeled:
        from ..data import Unlabeled

        train = Unlabeled(train)
    val = load_split(args, clip, "val", shots=None if args.shots is None else min(args.shots, 4), seed=seed,
                     allow_fewer=args.allow_fewer) if has_splits(args) else None
    learner = create_learner(args.method, clip, train.classnames, seed=seed, **method_keys)  # seeded prompt init
    if args.init_from:
        learner.init_from(args.init_from)
    if args.overwrite:
        for path in old_run:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    print(recipe_line)
    PromptTrainer(learner, config).fit(train, val, resume=args.resume)
    return 0


def _recipe(args) -> tuple[dict, dict, str]:
    """The run's recipe: TrainConfig values, method keywords, and what to print about it."""
    if args.recipe == "none":
        return TrainConfig().to_dict(), {}, "recipe: none (TrainConfig's defaults)"
    protocol = args.protocol or ("unsupervised" if getattr(args, "unlabeled", False) else
                                 "base2novel" if args.classes == "base" else "few-shot")
    try:
        recipe = get_recipe(args.method, protocol, args.shots, args.dataset)
    except ValueError as err:
        raise ValueError(f"{err} (--protocol picks another recipe; --recipe none trains with TrainConfig's "
                         f"defaults)") from None
    values = recipe.config.to_dict()
    line = f"recipe: {recipe.config.recipe}, from {recipe.source}"
    if args.data == "procedural":  # rendered tensors: nothing to crop or flip, and one cached pass is exact
        values.update(augment=None, cache_passes=TrainConfig.cache_passes)
        line += "; not augmented: procedural data comes as tensors"
    return values, recipe.method_kwargs, line + (f"\nrecipe notes: {recipe.notes}" if recipe.notes else "")


def _existing_run(args) -> list[Path]:
    """The files of a run already in --out; refused unless --resume or --overwrite says what to do with them."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if found and not (args.resume or args.overwrite):
        raise FileExistsError(f"--out {out} already holds a run ({', '.join(p.name for p in found)}); pass --resume "
                              f"to continue it or --overwrite to replace it")
    return found


def _read_config(path) -> dict:
    """A --config file as a dict of TrainConfig fields, each checked against the field's type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        yaml = _yaml()
        try:
            with open(path) as f:  # a stream: the error names the file, not "<unicode string>"
                data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path} is not valid YAML ({err})") from err
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path} is not valid JSON ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of TrainConfig keys, not a {type(data).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in data.items():
        if key not in hints:
            raise ValueError(f"--config {path}: unknown key {key!r}{_did_you_mean(key, hints)}; "
                             f"TrainConfig keys: {', '.join(hints)}")
        check_value(key, value, hints[key], f"--config {path}")
    return data


def _split_overrides(overrides: dict, method: str) -> tuple[dict, dict]:
    """key=value overrides as (TrainConfig fields, method keywords), each checked against its type."""
    from ..registry import METHODS, _load_builtin

    _load_builtin()
    hints, keywords = typing.get_type_hints(TrainConfig), keyword_types(METHODS.get(method))
    keywords["objectives"] = list  # every learner takes them, e.g. objectives='["ce", ["kgcoop", {"weight": 8}]]'
    keywords["head"] = str  # and head=zeroshot | linear-probe (LP-FT)
    train, method_keys = {}, {}
    for key, value in overrides.items():
        if key in FLAG_FIELDS:
            raise ValueError(f"{key}={value}: pass {FLAG_FIELDS[key]} {value} instead; {key} is not a key=value "
                             f"override in the CLI")
        if key in hints:
            check_value(key, value, hints[key], "TrainConfig")
            train[key] = value
        elif key in keywords:
            check_value(key, value, keywords[key], method)
            method_keys[key] = value
        else:
            fields = [k for k in hints if k not in FLAG_FIELDS]
            raise ValueError(f"unknown key {key!r}{_did_you_mean(key, [*fields, *keywords])}; TrainConfig keys: "
                             f"{', '.join(fields)}; {method} keywords: {', '.join(keywords) or '(none)'}")
    return train, method_keys


def keyword_types(cls) -> dict:
    """Keyword arguments of `cls(...)` and their types (from annotations, else from the default); keywords
    a subclass passes on with **kwargs are its base class's."""
    out = {}
    for klass in cls.__mro__:
        parameters = inspect.signature(klass.__init__).parameters
        try:
            hints = typing.get_type_hints(klass.__init__)
        except (NameError, TypeError):  # an annotation that cannot be resolved here: use the defaults
            hints = {}
        for name, p in parameters.items():
            if p.default is not p.empty and name not in out:
                out[name] = hints.get(name, object if p.default is None else type(p.default))
        for old, new in getattr(klass.__init__, "renamed_keywords", {}).items():  # still accepted, with a warning
            out.setdefault(old, out.get(new, object))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return out
    return out


def check_value(key: str, value, expected, owner: str) -> None:
    if not _fits(value, expected):
        raise ValueError(f"invalid value {json.dumps(value)} for {key} ({owner}): expected {_describe(expected)}")


def _fits(value, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))  # JSON gives lists; strings are not meant here
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or expected) if isinstance(origin or expected, type) else True


def _describe(expected) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(expected))
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in typing.get_args(expected))
    if origin in (list, tuple, collections.abc.Sequence):
        return 'a JSON list, e.g. ["a", "b"]'
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _folder(args, clip, photos: bool = False):
    from ..data import ImageFolderDataset

    dataset = ImageFolderDataset(args.data, transform=None if photos else clip.preprocess,
                                 skip_unreadable=args.skip_unreadable)
    return _classes(args, dataset)


def _classes(args, dataset):
    from ..data import base_novel, select_classes

    if args.classes == "all":
        return dataset
    return select_classes(dataset, getattr(base_novel(dataset.classnames), args.classes))

"""`promptkit bench`: the papers' protocols over datasets x methods x shots x seeds, every cell its own
resumable run directory, evaluation features cached, results in `results.csv` and `summary.md`.

Layout of `out`:
    sweep.json                           the settings that define what a cell means (a rerun must match them)
    cells/<method>/<train set>[-base]/<K>shot/seed<S>/   the trainer's run directory (checkpoint, prompts, logs)
        eval/<dataset>-<classes>.json    one evaluation (written last: its presence means done)
    features/<digest>.safetensors        evaluation image features (FeatureCache)
    results.csv, summary.md, plots/      written from every finished evaluation of the sweep

Under `torchrun` every rank walks the same cells: each cell is trained by all ranks together (the trainer
splits every batch over them), evaluation and test-time adaptation are sharded over the ranks, and rank 0 alone
writes files and takes the decisions read from them (which cells are finished, which resume).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint import load_json, save_json
from ..training import distributed

# Each protocol: the recipe it trains with, its default shots, and how its cells are laid out.
PROTOCOLS = {
    "few-shot": {"recipe": "few-shot", "shots": [1, 2, 4, 8, 16]},
    "base2novel": {"recipe": "base2novel", "shots": [16]},
    "cross-dataset": {"recipe": "cross-dataset", "shots": [16]},
    "domain-generalization": {"recipe": "cross-dataset", "shots": [16]},
    "tta": {"recipe": None, "shots": [0]},
}
SOURCE = "imagenet"
PROCEDURAL = "procedural"
# The procedural benchmark's domains stand in for datasets (`--root procedural`): "photo" is the source; 8 test
# images per class (384 per domain) keep the whole sweep to minutes on a CPU.
PROCEDURAL_DATASETS = ("photo", "sketch", "noisy", "palette")
PROCEDURAL_TEST_PER_CLASS = 8
# Settings that change what a cell's numbers mean: a rerun into the same `out` must keep them.
SWEEP_KEYS = ("protocol", "source", "arch", "pretrained", "precision", "quick_gelu", "overrides")
# Test-time adaptation (`--protocol tta`): TPT's tables, the ImageNet shifts and the 10 cross-domain sets.
TTA_DATASETS = ("imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch", "oxford_flowers", "dtd",
                "oxford_pets", "stanford_cars", "ucf101", "caltech101", "food101", "sun397", "fgvc_aircraft", "eurosat")
ZERO_SHOT = "zeroshot"


@dataclass(frozen=True)
class Cell:
    """One training run (method, training set and classes, shots, seed) and the evaluations of its prompts.
    Zero-shot cells train nothing (shots and seed 0)."""

    method: str
    train: str
    classes: str
    shots: int
    seed: int
    evals: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def directory(self, out: Path) -> Path:
        part = self.train + ("-base" if self.classes == "base" else "")
        return out / "cells" / self.method / part / f"{self.shots}shot" / f"seed{self.seed}"


def default_datasets(protocol: str, root: str) -> list[str]:
    from ..data import FEW_SHOT_DATASETS, SHIFTS

    if root == PROCEDURAL:
        return list(PROCEDURAL_DATASETS) if protocol in ("few-shot", "base2novel", "tta") else list(
            PROCEDURAL_DATASETS[1:])
    if protocol in ("few-shot", "base2novel"):
        return list(FEW_SHOT_DATASETS)
    if protocol == "tta":
        return list(TTA_DATASETS)
    if protocol == "cross-dataset":
        return [d for d in FEW_SHOT_DATASETS if d != SOURCE]
    return list(SHIFTS)


def plan(protocol: str, datasets: Sequence[str], methods: Sequence[str], shots: Sequence[int],
         seeds: Sequence[int], source: str) -> list[Cell]:
    """The cells of a sweep, in the order they run (method by method, so a method's table fills first)."""
    cells = []
    for method in methods:
        zero = method == ZERO_SHOT
        if protocol == "tta":  # nothing trained: each adapter runs over each test set once per seed
            cells += [Cell(method, dataset, "all", 0, 0 if zero else seed, ((dataset, "all"),))
                      for dataset in datasets for seed in ([seeds[0]] if zero else seeds)]
        elif protocol in ("few-shot", "base2novel"):
            classes = "base" if protocol == "base2novel" else "all"
            evals = (("base", "novel") if protocol == "base2novel" else ("all",))
            for dataset in datasets:
                for k in ([0] if zero else shots):
                    for seed in ([0] if zero else seeds):
                        cells.append(Cell(method, dataset, "all" if zero else classes, k, seed,
                                          tuple((dataset, c) for c in evals)))
        else:  # train on the source, evaluate there and on every target
            targets = ((source, "all"),) + tuple((d, "all") for d in datasets)
            for k in ([0] if zero else shots):
                for seed in ([0] if zero else seeds):
                    cells.append(Cell(method, source, "all", k, seed, targets))
    return cells


def check_request(protocol: str, methods: Sequence[str], datasets: Sequence[str], shots: Sequence[int],
                  seeds: Sequence[int], root: str, source: str, world: int = 1) -> list[str]:
    """Every mistake of a request, found before anything runs. Returns the datasets' canonical names.

    Args:
        world: processes the sweep runs in (torchrun's WORLD_SIZE).

    Raises:
        ValueError: an unknown protocol or method, a method without a recipe for the protocol, repeated or
            invalid seeds or shots, a dataset the protocol cannot use, a stream adapter under torchrun.
    """
    from ..data import FEW_SHOT_DATASETS, SHIFTS, benchmark_name
    from ..recipes import get_recipe
    from ..registry import list_methods

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    for what, values in (("seeds", seeds), ("shots", shots), ("methods", methods), ("datasets", datasets)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise ValueError(f"--{what} repeats {', '.join(repeated)}: each value once")
    if not methods:
        raise ValueError("--methods: name at least one method (promptkit list-methods)")
    if protocol == "tta":
        if shots != [0]:
            raise ValueError("the tta protocol trains nothing: leave out --shots")
    elif any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shots):
        raise ValueError(f"--shots must be positive integers, got {list(shots)}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in seeds):
        raise ValueError(f"--seeds must be positive integers (CoOp's seeds are 1 2 3), got {list(seeds)}")
    known = list_methods()
    if protocol == "tta":
        from ..registry import ADAPTERS
        from ..tta import TDA  # noqa: F401  (registers the adapters)

        unknown = [m for m in methods if m != ZERO_SHOT and m not in ADAPTERS.names()]
        if unknown:
            raise ValueError(f"method {unknown[0]} is unknown to the tta protocol: it runs test-time adapters "
                             f"({', '.join(ADAPTERS.names())}) and zeroshot")
        streams = [m for m in methods if m != ZERO_SHOT and not ADAPTERS.get(m).episodic]
        if streams and world > 1:
            raise ValueError(f"{streams[0]} adapts as one stream over the test set (each prediction depends on every "
                             f"image before it), which {world} processes cannot split: run its cells without "
                             f"torchrun (same --out), and the episodic adapters with it")
        methods = []
    for method in methods:
        if method not in known:
            raise ValueError(f"unknown method {method!r}; methods: {', '.join(known)}")
        if method == ZERO_SHOT:
            continue
        for k in shots:
            try:
                get_recipe(method, PROTOCOLS[protocol]["recipe"], k)
            except ValueError as err:
                raise ValueError(f"method {method} is unknown to the {protocol} protocol: {err}") from None
    if root == PROCEDURAL:
        bad = [d for d in datasets if d not in PROCEDURAL_DATASETS]
        if bad:
            raise ValueError(f"--root procedural: datasets are its domains {', '.join(PROCEDURAL_DATASETS)}; "
                             f"not {', '.join(bad)}")
        if protocol in ("cross-dataset", "domain-generalization") and source in datasets:
            raise ValueError(f"{source} is the source domain; --datasets names the targets")
        return list(datasets)
    names = [benchmark_name(d) for d in datasets]
    if protocol == "tta":
        return names
    if protocol in ("few-shot", "base2novel"):
        bad = [d for d in names if d not in FEW_SHOT_DATASETS]
        if bad:
            raise ValueError(f"the {protocol} protocol trains on each dataset; {', '.join(bad)} have only a test "
                             f"split (use --protocol domain-generalization or tta)")
    else:
        if source in names:
            raise ValueError(f"{source} is the source dataset of the {protocol} protocol; --datasets names the "
                             f"targets")
        wanted = SHIFTS if protocol == "domain-generalization" else FEW_SHOT_DATASETS
        bad = [d for d in names if d not in wanted]
        if bad:
            raise ValueError(f"the {protocol} protocol evaluates on {', '.join(d for d in wanted if d != source)}; "
                             f"not {', '.join(bad)}")
    return names


def check_data(cells: Sequence[Cell], root: str) -> None:
    """Reads every split file and class folder the sweep needs (not the images), so a missing dataset or a
    split file of another dataset stops the sweep before any cell runs."""
    from ..data.benchmarks import read_split

    if root == PROCEDURAL:
        return
    needed = {(c.train, "train") for c in cells if c.shots} | {(d, "test") for c in cells for d, _ in c.evals}
    problems, kind = [], None
    for name, split in sorted(needed):
        try:
            read_split(name, root, split)
        except (FileNotFoundError, ValueError) as err:
            kind = kind or type(err)
            if str(err) not in problems:
                problems.append(str(err))
    if problems:
        raise kind("the sweep cannot start: " + " | ".join(problems)
                   + " (promptkit data check NAME --root DIR lists every problem of a dataset)")


def check_sweep_file(out: Path, settings: dict) -> None:
    """Refuses an output folder holding a sweep with other settings, naming each setting that differs."""
    path = out / "sweep.json"
    if not path.is_file():
        if out.is_dir() and (out / "cells").exists():
            raise FileExistsError(f"--out {out} holds cells but no sweep.json; use an empty folder")
        return
    saved = load_json(path)
    differ = [f"{key}: {saved.get(key)!r} there, {settings.get(key)!r} now" for key in SWEEP_KEYS
              if saved.get(key) != settings.get(key)]
    if differ:
        raise ValueError(f"--out {out} holds a sweep with other settings ({'; '.join(differ)}); its finished cells "
                         f"would mix with these: use another --out, or the same settings")


class Bench:
    """Runs a sweep's cells (skipping finished ones, resuming unfinished ones) and writes its tables.

    Args:
        clip: the FrozenCLIP every cell uses.
        root: the data root (CoOp's `$DATA`) or "procedural".
        out: the sweep's output folder.
        protocol: one of `PROTOCOLS`.
        overrides: TrainConfig values over each method's recipe (e.g. {"epochs": 1}); part of the sweep's
            settings.
        log: where progress lines go.
    """

    def __init__(self, clip, root: str, out, protocol: str, overrides: dict | None = None,
                 log: Callable[[str], None] = print):
        from .features import FeatureCache

        self.clip, self.root, self.out, self.protocol = clip, str(root), Path(out), protocol
        self.overrides = dict(overrides or {})
        self.log = log if distributed.is_main() else (lambda line: None)
        self.cache = FeatureCache(self.out / "features", clip) if self.root != PROCEDURAL else None
        self.trained = self.resumed = self.skipped = 0
        # The procedural test sets (tensors, no files to key a FeatureCache by) and their features, once per sweep.
        self._tests: dict = {}
        self._rendered: dict = {}

    # -- data -------------------------------------------------------------------------------------------
    def dataset(self, name: str, split: str, shots: int | None = None, seed: int = 1, classes: str = "all",
                transform=None):
        if self.root == PROCEDURAL:
            from ..data import ProceduralBenchmark

            return ProceduralBenchmark(n_test=PROCEDURAL_TEST_PER_CLASS).split(split, shots=shots, seed=seed,
                                                                               classes=classes, domain=name)
        from ..data import load_benchmark

        return load_benchmark(name, self.root, split, transform or self.clip.preprocess, shots=shots, seed=seed,
                              classes=classes)

    # -- cells ------------------------------------------------------------------------------------------
    def run(self, cells: Sequence[Cell]) -> list[dict]:
        for i, cell in enumerate(cells, 1):
            directory = cell.directory(self.out)
            todo = self._agree([e for e in cell.evals if not self._eval_path(directory, *e).is_file()])
            if not todo:
                self.skipped += 1
                continue
            self.log(f"[{i}/{len(cells)}] {cell.method} on {cell.train} ({cell.classes}), {cell.shots} shots, "
                     f"seed {cell.seed}")
            prompts = None if cell.method == ZERO_SHOT or self.protocol == "tta" else self.train(cell, directory)
            for dataset, classes in todo:
                metrics = (self.adapt(cell, dataset) if self.protocol == "tta" and cell.method != ZERO_SHOT
                           else self.evaluate(cell, prompts, dataset, classes))
                if distributed.is_main():
                    save_json({"top1": metrics["top1"], "macro_f1": metrics.get("macro_f1"), "n": metrics["n"]},
                              self._eval_path(directory, dataset, classes))
        distributed.barrier()  # every rank reads the evaluations rank 0 wrote
        return self.rows(cells)

    def _agree(self, value):
        """Rank 0's reading of the output folder, so every rank takes the same branch (one process: itself)."""
        return distributed.from_main(value, self.clip.device)

    def train(self, cell: Cell, directory: Path) -> Path:
        from ..data import train_transform
        from ..recipes import get_recipe
        from ..registry import METHODS, create_learner
        from ..training.cli import keyword_types
        from ..training.config import TrainConfig
        from ..training.trainer import PromptTrainer

        prompts = directory / "prompts"
        if self._agree((prompts / "config.json").is_file()):
            return prompts
        procedural = self.root == PROCEDURAL
        recipe = get_recipe(cell.method, PROTOCOLS[self.protocol]["recipe"], cell.shots,
                            None if procedural else cell.train)
        values = {**recipe.config.to_dict(), **self.overrides, "seed": cell.seed, "output_dir": str(directory),
                  "device": str(self.clip.device), "progress": False}
        if procedural:  # rendered tensors: nothing to crop or flip (as `promptkit train --data procedural`)
            values.update(augment=None, cache_passes=TrainConfig.cache_passes)
        config = TrainConfig.from_dict(values)
        transform = train_transform(self.clip, **config.augment) if config.augment and not procedural else None
        train = self.dataset(cell.train, "train", cell.shots, cell.seed, cell.classes, transform)
        keywords = dict(recipe.method_kwargs)
        if not procedural and "dataset" in keyword_types(METHODS.get(cell.method)):
            keywords.setdefault("dataset", cell.train)  # the method's per-dataset templates
        learner = create_learner(cell.method, self.clip, train.classnames, seed=cell.seed, **keywords)
        resume = self._agree((directory / "checkpoint").is_dir())
        self.resumed += resume
        self.trained += 1
        # CoOp's runs evaluate the last epoch's prompts on the test set: no validation during training. Learners
        # built from features (Tip-Adapter, the linear probe) search their hyperparameters on CoOp's few-shot val.
        val = self.dataset(cell.train, "val", cell.shots, cell.seed, cell.classes) if hasattr(learner, "fit") else None
        PromptTrainer(learner, config).fit(train, val, resume=resume)
        distributed.barrier()  # rank 0 has written the prompts every rank loads next
        return prompts

    @torch.no_grad()
    def evaluate(self, cell: Cell, prompts: Path | None, dataset: str, classes: str) -> dict:
        from ..checkpoint import load_pretrained
        from ..metrics import classification_metrics
        from ..registry import METHODS, create_learner
        from ..training.cli import keyword_types
        from ..training.config import TrainConfig
        from ..training.trainer import PromptTrainer

        if self.root == PROCEDURAL:  # rendered once per sweep
            if (dataset, classes) not in self._tests:
                self._tests[(dataset, classes)] = self.dataset(dataset, "test", classes=classes)
            test = self._tests[(dataset, classes)]
        else:
            test = self.dataset(dataset, "test", classes=classes)
        if prompts is None:
            keywords = ({"dataset": dataset} if self.root != PROCEDURAL and "dataset" in
                        keyword_types(METHODS.get(ZERO_SHOT)) else {})
            learner = create_learner(ZERO_SHOT, self.clip, test.classnames, **keywords)
        else:
            learner = load_pretrained(prompts, self.clip, classnames=test.classnames)
        learner.to(self.clip.device).eval()
        if learner.image_prompted:
            config = TrainConfig(output_dir=None, device=str(self.clip.device), progress=False)
            return PromptTrainer(learner, config).evaluate(test)
        if self.cache is not None:
            features, labels = self.cache.features(test)
        elif (dataset, classes) in self._rendered:
            features, labels = self._rendered[(dataset, classes)]
        else:
            images, labels = zip(*(test[i] for i in range(len(test))))
            features = torch.cat([self.clip.encode_image(chunk.to(self.clip.device)).float()
                                  for chunk in torch.stack(images).split(256)])
            labels = torch.as_tensor(labels, device=self.clip.device)
            self._rendered[(dataset, classes)] = features, labels
        text = learner.text_features()
        logits = torch.cat([learner(image_features=chunk, text_features=text).float()
                            for chunk in features.split(256)])
        return classification_metrics(logits, labels)

    @torch.no_grad()
    def adapt(self, cell: Cell, dataset: str) -> dict:
        """Runs a test-time adapter over a test set in a seeded order, as `promptkit tta` (the authors'
        settings for the dataset, TPT's CoOp-style "a photo of a" context or the adapter's templates)."""
        from ..learners import CoOp, ZeroShotCLIP
        from ..registry import ADAPTERS, create_adapter
        from ..training.cli import keyword_types
        from ..tta import adapt_dataset
        from ..tta.defaults import classifier_templates

        procedural = self.root == PROCEDURAL
        # image files reach the adapter as PIL images: crops are cut from the full-resolution photo, as in TPT
        test = self.dataset(dataset, "test") if procedural else self._photos(dataset)
        name = None if procedural else dataset
        method = ADAPTERS.get(cell.method).method
        learner = (CoOp(self.clip, test.classnames, ctx_init="a photo of a") if method in ("tpt", "ctpt") else
                   ZeroShotCLIP(self.clip, test.classnames, templates=classifier_templates(cell.method, name)))
        keywords = dict(self.overrides)
        if "seed" in keyword_types(ADAPTERS.get(cell.method)):
            keywords.setdefault("seed", cell.seed)  # the views' random crops and augmentations
        with torch.enable_grad():  # TPT and C-TPT take gradient steps on the prompt
            adapter = create_adapter(cell.method, learner, dataset=name, **keywords)
            order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cell.seed)).tolist()
            result = adapt_dataset(adapter, test, batch_size=16, indices=order, progress=False)
        return {k: v for k, v in result.items() if k != "predictions"}

    def _photos(self, dataset: str):
        from ..data import load_benchmark

        return load_benchmark(dataset, self.root, "test")

    @staticmethod
    def _eval_path(directory: Path, dataset: str, classes: str) -> Path:
        return directory / "eval" / f"{dataset}-{classes}.json"

    # -- results ----------------------------------------------------------------------------------------
    def rows(self, cells: Sequence[Cell]) -> list[dict]:
        rows = []
        for cell in cells:
            for dataset, classes in cell.evals:
                path = self._eval_path(cell.directory(self.out), dataset, classes)
                if path.is_file():
                    result = load_json(path)
                    rows.append({"protocol": self.protocol, "method": cell.method, "train": cell.train,
                                 "dataset": dataset, "classes": classes, "shots": cell.shots, "seed": cell.seed,
                                 "top1": round(result["top1"], 4), "n": result["n"],
                                 "run_dir": str(cell.directory(self.out).relative_to(self.out))})
        return rows


def write_results(rows: Sequence[dict], path: Path) -> None:
    columns = ["protocol", "method", "train", "dataset", "classes", "shots", "seed", "top1", "n", "run_dir"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as the papers report over seeds."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def run_bench(clip, protocol: str, methods: Sequence[str], root, out, datasets: Sequence[str] | None = None,
              shots: Sequence[int] | None = None, seeds: Sequence[int] = (1, 2, 3), source: str | None = None,
              overrides: dict | None = None, model: dict | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Runs (or finishes) a sweep and writes `results.csv` and `summary.md` into `out`.

    Args:
        clip: the FrozenCLIP of every cell.
        protocol: "few-shot", "base2novel" (train on the base half, evaluate base and novel),
            "cross-dataset" (train on ImageNet, evaluate on the other 10) or "domain-generalization" (train on
            ImageNet, evaluate on ImageNet-V2, -Sketch, -A, -R).
        methods: registered method names; each needs a published recipe for the protocol ("zeroshot" needs none).
        root: the data root (CoOp's `$DATA`), or "procedural" for the embedded benchmark's domains.
        out: the sweep's folder; a rerun skips finished cells and resumes unfinished ones.
        datasets: the datasets (the targets, for cross-dataset and domain generalisation); default: the
            protocol's.
        shots: shots per class; default 1 2 4 8 16 for few-shot, else 16.
        seeds: few-shot draw and training seeds.
        source: the training set of cross-dataset and domain generalisation (default ImageNet; "photo" on
            the procedural benchmark).
        overrides: TrainConfig values over every recipe, e.g. {"epochs": 1}.
        model: how `clip` was loaded ({"arch", "pretrained", "precision", "quick_gelu"}), recorded in sweep.json.
        log: where progress lines go (rank 0's, under torchrun).

    Under `torchrun` every rank must call this with the same arguments (see the module docstring); each
    returns all the rows.

    Raises:
        ValueError, FileNotFoundError: a mistake in the request, a dataset the sweep cannot read, or an `out`
            from a sweep with other settings; all found before any cell runs.
    """
    from .tables import write_summary

    root, out = str(root), Path(out)
    source = source or (PROCEDURAL_DATASETS[0] if root == PROCEDURAL else SOURCE)
    shots = list(shots or PROTOCOLS.get(protocol, {}).get("shots", [16]))
    if protocol in PROTOCOLS and not datasets:
        datasets = default_datasets(protocol, root)
    world = distributed.world_size()
    datasets = check_request(protocol, list(methods), list(datasets or []), shots, list(seeds), root, source, world)
    model = model or {"arch": getattr(clip, "arch", None), "pretrained": getattr(clip, "pretrained", None)}
    settings = {"protocol": protocol, "source": source if protocol in ("cross-dataset", "domain-generalization")
                else None, "arch": model.get("arch"), "pretrained": model.get("pretrained"),
                "precision": model.get("precision", "fp32"), "quick_gelu": model.get("quick_gelu"),
                "overrides": dict(overrides or {})}
    check_sweep_file(out, settings)
    cells = plan(protocol, datasets, methods, shots, seeds, source)
    check_data(cells, root)
    distributed.setup(clip.device)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "sweep.json").is_file():
            save_json(settings, out / "sweep.json")
    bench = Bench(clip, root, out, protocol, overrides, log)
    rows = bench.run(cells)
    if distributed.is_main():
        write_results(rows, out / "results.csv")
        write_summary(rows, {**settings, "seeds": list(seeds), "source": source}, out)
    cache = bench.cache
    bench.log(f"{len(cells)} cells: {bench.skipped} already finished, {bench.trained} trained ({bench.resumed} "
              f"resumed)" + (f"; evaluation features: {cache.hits} reused, {cache.misses} computed" if cache else "")
              + (f"; {world} processes" if world > 1 else "") + f"; wrote {out / 'results.csv'} and "
              f"{out / 'summary.md'}")
    distributed.barrier()  # the tables exist when any rank returns
    return rows

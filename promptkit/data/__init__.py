"""Datasets yielding `(image_tensor, label)`, each with `.classnames` and `.targets` (`MultiTaskDataset`: `(image,
label, task)`; `Unlabeled`: label -1)."""
from .folders import (BaseNovelSplit, CoOpSplitDataset, ImageFolderDataset, Subset, Unlabeled, base_novel, check_labels,
                      few_shot, few_shot_val, has_random_transform, is_unlabeled, select_classes, train_transform)
from .benchmarks import (FEW_SHOT_DATASETS, SHIFTS, CheckReport, benchmark_name, check_benchmark, coop_few_shot,
                         load_benchmark)
from .multitask import MultiTaskDataset
from .procedural import CLASSNAMES, DOMAINS, ProceduralBenchmark, render

__all__ = ["ImageFolderDataset", "CoOpSplitDataset", "Subset", "few_shot", "few_shot_val", "base_novel",
           "BaseNovelSplit", "MultiTaskDataset", "Unlabeled", "is_unlabeled", "select_classes", "check_labels",
           "train_transform", "has_random_transform", "ProceduralBenchmark", "CLASSNAMES", "DOMAINS", "render",
           "load_benchmark", "check_benchmark", "CheckReport", "benchmark_name", "coop_few_shot", "FEW_SHOT_DATASETS",
           "SHIFTS"]

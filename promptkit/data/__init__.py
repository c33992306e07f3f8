"""Datasets yielding `(image_tensor, label)`, each with `.classnames` and `.targets` (`MultiTaskDataset`: `(image,
label, task)`)."""
from .folders import (BaseNovelSplit, CoOpSplitDataset, ImageFolderDataset, Subset, base_novel, check_labels,
                      few_shot, few_shot_val, has_random_transform, select_classes, train_transform)
from .multitask import MultiTaskDataset
from .procedural import CLASSNAMES, DOMAINS, ProceduralBenchmark, render

__all__ = ["ImageFolderDataset", "CoOpSplitDataset", "Subset", "few_shot", "few_shot_val", "base_novel",
           "BaseNovelSplit", "MultiTaskDataset", "select_classes", "check_labels", "train_transform", "has_random_transform",
           "ProceduralBenchmark", "CLASSNAMES", "DOMAINS", "render"]

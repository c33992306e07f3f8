"""Datasets yielding `(image_tensor, label)`, each with `.classnames` and `.targets`."""
from .folders import (BaseNovelSplit, CoOpSplitDataset, ImageFolderDataset, Subset, base_novel, few_shot,
                      select_classes, train_transform)
from .procedural import CLASSNAMES, DOMAINS, ProceduralBenchmark, render

__all__ = ["ImageFolderDataset", "CoOpSplitDataset", "Subset", "few_shot", "base_novel", "BaseNovelSplit",
           "select_classes", "train_transform", "ProceduralBenchmark", "CLASSNAMES", "DOMAINS", "render"]

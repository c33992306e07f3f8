"""Multi-task datasets: several classification tasks, each with its own class names, in one training set."""
from __future__ import annotations

from typing import Mapping

import torch
from torch.utils.data import Dataset


class MultiTaskDataset(Dataset):
    """Several datasets (tasks) as one, yielding `(image, label, task)`.

    The class names of all tasks are merged into one list, `classnames` (in task order, a name that two tasks
    share once), and `label` indexes it; `task` is the task's index in `task_names`. A learner built with
    `tasks=dataset.tasks` scores each sample against its own task's classes only, so a batch may mix tasks
    (`PromptTrainer` passes the task ids on). `targets` and `task_ids` hold every sample's label and task.

    Args:
        tasks: task name -> a dataset of `(image, label)` with `.classnames` (its label order), e.g.
            `{"sketch": bench.split("train", domain="sketch"), "photo": ...}`.

    Raises:
        ValueError: no tasks, a task with no classes or no samples, or a task label outside its classes.
        TypeError: a task's dataset without `.classnames`.
    """

    def __init__(self, tasks: Mapping[str, Dataset]):
        from ..learners.base import check_classnames

        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError("MultiTaskDataset needs a mapping task name -> dataset with at least one task, e.g. "
                             "{'sketch': sketch_train, 'photo': photo_train}")
        self.datasets = dict(tasks)
        self.task_names = [str(name) for name in tasks]
        self.tasks: dict[str, list[str]] = {}
        self.classnames: list[str] = []
        index: dict[str, int] = {}
        self.targets, self.task_ids, self._items = [], [], []
        for t, (name, dataset) in enumerate(self.datasets.items()):
            names = getattr(dataset, "classnames", None)
            if names is None:
                raise TypeError(f"task {name!r}: its dataset has no .classnames; give each task's dataset the list "
                                f"of its class names in label order")
            if len(names) == 0:
                raise ValueError(f"task {name!r} has no classes; every task needs at least one class name")
            names = check_classnames(names)
            self.tasks[name] = names
            for classname in names:
                if classname not in index:
                    index[classname] = len(self.classnames)
                    self.classnames.append(classname)
            targets = getattr(dataset, "targets", None)
            labels = [int(y) for y in (targets if targets is not None else [dataset[i][1] for i in range(len(dataset))])]
            if not labels:
                raise ValueError(f"task {name!r} has no samples")
            bad = [y for y in labels if not 0 <= y < len(names)]
            if bad:
                raise ValueError(f"task {name!r} has labels outside [0, {len(names)}), e.g. {bad[0]}; its labels must "
                                 f"index its own classnames")
            merged = [index[names[y]] for y in labels]
            self.targets += merged
            self.task_ids += [t] * len(labels)
            self._items += [(name, i) for i in range(len(labels))]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        name, i = self._items[index]
        return self.datasets[name][i][0], self.targets[index], self.task_ids[index]

    def task_labels(self, task: str) -> list[int]:
        """Label (into `classnames`) of each class of `task`, in the task's own label order."""
        return [self.classnames.index(c) for c in self.tasks[task]]

    def __repr__(self) -> str:
        sizes = torch.bincount(torch.tensor(self.task_ids), minlength=len(self.task_names)).tolist()
        body = ", ".join(f"{name}: {len(self.tasks[name])} classes, {n} samples"
                         for name, n in zip(self.task_names, sizes))
        return f"MultiTaskDataset({body})"

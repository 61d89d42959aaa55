"""Class-incremental scenarios: class order per seed, task splits, per-task datasets.

The class order is a permutation fixed by the run seed and shared by every method; tasks are
contiguous chunks of it and labels are remapped in task order (task t owns labels
``[t·C/T, (t+1)·C/T)``), as in every reference code.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from benchmarks.config import BenchmarkConfig, ConfigError
from benchmarks.data.datasets import DatasetInfo, DatasetSplit, build_transform, load_dataset
from methods.base import Task

CLASS_ORDERS = ("seeded", "natural", "coda", "numpy")


def class_order(num_classes: int, mode: str, seed: int) -> List[int]:
    """Order in which the dataset's classes are presented.

    * ``seeded``: ``random.Random(seed).shuffle`` -- the order of the SMoPE code for every seed
      and of the CODA-Prompt code for seeds > 0 (``random.seed(seed); random.shuffle``);
    * ``coda``: natural order for seed 0, ``seeded`` otherwise (CODA-Prompt / VQ-Prompt);
    * ``numpy``: ``np.random.seed(seed); np.random.permutation`` (PyCIL / LAMDA-PILOT);
    * ``natural``: 0..C-1 (l2p-pytorch, dualprompt-pytorch, HiDe-Prompt).
    """
    order = list(range(num_classes))
    if mode == "natural" or (mode == "coda" and seed == 0):
        return order
    if mode in ("seeded", "coda"):
        random.Random(seed).shuffle(order)
        return order
    if mode == "numpy":
        return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]
    raise ConfigError(f"unknown class_order '{mode}'; choose one of {', '.join(CLASS_ORDERS)}")


class TaskDataset(Dataset):
    """The samples of some classes of a split, with labels remapped and a transform.

    Items are ``(image, label, index)``; ``index`` is the position in this dataset, which the
    protocol uses as the key of the query-feature cache.
    """

    def __init__(self, split: DatasetSplit, indices: np.ndarray, label_map: Dict[int, int], transform) -> None:
        self.split = split
        self.indices = indices
        self.labels = np.array([label_map[int(split.targets[i])] for i in indices], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img = self.split.load(int(self.indices[i]))
        return self.transform(img), int(self.labels[i]), i

    def with_transform(self, transform) -> "TaskDataset":
        other = TaskDataset.__new__(TaskDataset)
        other.split, other.indices, other.labels, other.transform = self.split, self.indices, self.labels, transform
        return other


@dataclass
class Scenario:
    """A class-incremental benchmark instance: tasks and their train / test datasets."""

    name: str
    num_tasks: int
    num_classes: int
    order: List[int]  # original class ids in presentation order
    tasks: List[Task]
    train_sets: List[TaskDataset]
    test_sets: List[TaskDataset]
    info: DatasetInfo
    image_size: int
    eval_split: str = "test"  # "val" when a validation split replaces the test set
    test_transform: object = None
    class_names: List[str] = field(default_factory=list)

    def describe(self) -> Dict[str, object]:
        """JSON-able description stored in result.json."""
        return {
            "name": self.name,
            "num_tasks": self.num_tasks,
            "num_classes": self.num_classes,
            "class_order": self.order,
            "train_sizes": [len(d) for d in self.train_sets],
            "eval_sizes": [len(d) for d in self.test_sets],
            "eval_split": self.eval_split,
            "image_size": self.image_size,
            "source": self.info.source,
            **{k: v for k, v in self.info.extra.items()},
        }


def _split_validation(split: DatasetSplit, idx: np.ndarray, fraction: float, seed: int):
    """Per-class seeded split of ``idx`` into (train, validation) index arrays."""
    rng = np.random.RandomState(seed)
    tr, va = [], []
    targets = split.targets[idx]
    for c in np.unique(targets):
        ci = idx[targets == c]
        ci = ci[rng.permutation(len(ci))]
        k = max(1, int(round(len(ci) * fraction)))
        va.append(ci[:k])
        tr.append(ci[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def build_scenario(cfg: BenchmarkConfig, seed: int, image_size: int) -> Scenario:
    """Load the data set and split it into ``cfg.num_tasks`` tasks for this seed."""
    image_size = cfg.image_size or image_size
    train, test, info = load_dataset(cfg, image_size)
    if cfg.pretrain_holdout and "pretrain_holdout_images" not in info.extra:  # the loader has no spare pool
        raise ConfigError(f"benchmark.pretrain_holdout is not available for {cfg.name} (it renders only the images a run uses)")
    total = info.num_classes
    n_cls = cfg.num_classes or total
    if n_cls > total:
        raise ConfigError(f"benchmark.num_classes={n_cls} but {cfg.name} has only {total} classes")
    if cfg.num_tasks < 1 or n_cls % cfg.num_tasks != 0:
        raise ConfigError(f"{n_cls} classes cannot be split evenly into {cfg.num_tasks} tasks")
    order = class_order(total, cfg.class_order, seed)[:n_cls]
    per = n_cls // cfg.num_tasks
    offsets = [t * per for t in range(cfg.num_tasks + 1)]
    label_map = {c: i for i, c in enumerate(order)}
    train_tf = build_transform(cfg, image_size, info.native_size, train=True)
    test_tf = build_transform(cfg, image_size, info.native_size, train=False)
    tasks, train_sets, test_sets = [], [], []
    eval_split = "test"
    for t in range(cfg.num_tasks):
        classes = order[offsets[t] : offsets[t + 1]]
        tr_idx = np.flatnonzero(np.isin(train.targets, classes))
        if cfg.val_fraction > 0:
            tr_idx, va_idx = _split_validation(train, tr_idx, cfg.val_fraction, seed)
            eval_set = TaskDataset(train, va_idx, label_map, test_tf)
            eval_split = "val"
        else:
            eval_set = TaskDataset(test, np.flatnonzero(np.isin(test.targets, classes)), label_map, test_tf)
        if len(tr_idx) == 0 or len(eval_set) == 0:
            raise ConfigError(f"task {t} of {cfg.name} has no training or evaluation images")
        train_sets.append(TaskDataset(train, tr_idx, label_map, train_tf))
        test_sets.append(eval_set)
        tasks.append(Task(t, cfg.num_tasks, offsets[t], offsets[t + 1], offsets))
    names = [train.class_names[c] if c < len(train.class_names) else str(c) for c in order]
    return Scenario(cfg.name, cfg.num_tasks, n_cls, order, tasks, train_sets, test_sets, info, image_size,
                    eval_split, test_tf, names)

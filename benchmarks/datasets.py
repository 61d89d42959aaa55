"""Data sets and transforms.

A data set loader returns a train and a test :class:`DatasetSplit`. In-memory sets (synthetic,
CIFAR-100, Fashion-MNIST) hold uint8 tensors; folder sets (ImageNet-R, CUB-200) hold file paths
and decode on access. ``scenarios.py`` turns a split into per-task datasets.

Missing or incomplete data raises :class:`DataError`, whose message names the expected layout and
where to get the files (the CLI prints it and exits with status 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2 as T

from benchmarks.config import BenchmarkConfig


class DataError(RuntimeError):
    """A data set is missing or malformed; the message is one sentence for the user."""


@dataclass
class DatasetSplit:
    """One split of a data set: images (uint8 tensor) or file paths, and integer targets."""

    targets: np.ndarray
    images: Optional[Tensor] = None  # (N, C, H, W) uint8
    paths: Optional[List[str]] = None
    class_names: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i: int) -> Tensor:
        """Image ``i`` as a (3, H, W) uint8 tensor."""
        if self.images is not None:
            img = self.images[i]
        else:
            from torchvision.io import ImageReadMode, decode_image

            img = decode_image(self.paths[i], mode=ImageReadMode.RGB)
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return img


@dataclass
class DatasetInfo:
    """Facts about a data set that the result records and the transforms need."""

    name: str
    num_classes: int
    native_size: int  # typical image side in pixels
    default_tasks: int
    source: str  # where the files come from
    extra: Dict[str, object] = field(default_factory=dict)


Loader = Callable[[BenchmarkConfig, int], Tuple[DatasetSplit, DatasetSplit, DatasetInfo]]
_DATASETS: Dict[str, Loader] = {}
_DEFAULT_TASKS: Dict[str, int] = {}


def register_dataset(name: str, default_tasks: int) -> Callable[[Loader], Loader]:
    """Register a loader ``fn(benchmark_cfg, image_size) -> (train, test, info)``."""

    def deco(fn: Loader) -> Loader:
        _DATASETS[name] = fn
        _DEFAULT_TASKS[name] = default_tasks
        return fn

    return deco


def list_datasets() -> List[str]:
    return sorted(_DATASETS)


def load_dataset(cfg: BenchmarkConfig, image_size: int) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    if cfg.name not in _DATASETS:
        raise DataError(f"unknown benchmark '{cfg.name}'; available benchmarks: {', '.join(list_datasets())}")
    return _DATASETS[cfg.name](cfg, image_size)


# --- synthetic -----------------------------------------------------------------------------

@register_dataset("synthetic", default_tasks=5)
def load_synthetic(cfg: BenchmarkConfig, image_size: int) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    """Procedural classes (``benchmarks/synthetic.py``), namespace 'cl', disjoint from pretraining."""
    from benchmarks.synthetic import make_synthetic

    n_cls = cfg.num_classes or 10
    size = image_size
    xtr, ytr = make_synthetic(range(n_cls), cfg.train_per_class or 100, size, "cl", "train")
    xte, yte = make_synthetic(range(n_cls), cfg.test_per_class or 50, size, "cl", "test")
    names = [f"syn{c}" for c in range(n_cls)]
    info = DatasetInfo("synthetic", n_cls, size, 5, "procedural (benchmarks/synthetic.py), no download")
    return (
        DatasetSplit(ytr.numpy(), images=xtr, class_names=names),
        DatasetSplit(yte.numpy(), images=xte, class_names=names),
        info,
    )


# --- CIFAR-100 -----------------------------------------------------------------------------

@register_dataset("cifar100", default_tasks=10)
def load_cifar100(cfg: BenchmarkConfig, image_size: int) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    """torchvision CIFAR100 (``<data_root>/cifar-100-python``); downloads when online."""
    from torchvision.datasets import CIFAR100

    root = Path(cfg.data_root)
    splits = []
    for train in (True, False):
        try:
            ds = CIFAR100(str(root), train=train, download=False)
        except RuntimeError:
            try:
                ds = CIFAR100(str(root), train=train, download=True)
            except Exception as e:  # no network, or a broken archive
                raise DataError(
                    f"CIFAR-100 not found under {root}/cifar-100-python (expected the python version: "
                    f"train, test, meta) and the download from https://www.cs.toronto.edu/~kriz/cifar.html failed ({type(e).__name__})"
                ) from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(DatasetSplit(np.asarray(ds.targets, dtype=np.int64), images=images, class_names=list(ds.classes)))
    info = DatasetInfo("cifar100", 100, 32, 10, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")
    return splits[0], splits[1], info


# --- transforms ----------------------------------------------------------------------------

_NORMS = {
    "none": None,
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def build_transform(cfg: BenchmarkConfig, image_size: int, native_size: int, train: bool) -> T.Compose:
    """uint8 (3, H, W) -> float (3, S, S). ``default`` picks per native size (see README)."""
    if cfg.normalize not in _NORMS:
        raise DataError(f"unknown normalize '{cfg.normalize}'; choose one of {', '.join(_NORMS)}")
    ops: List[object] = []
    kind = cfg.train_transform if train else cfg.test_transform
    if train:
        if kind == "default":
            kind = "crop_flip" if native_size == image_size else "rrc_flip"
        if kind == "none":
            ops.append(T.Resize(image_size, antialias=True) if native_size != image_size else T.Identity())
        elif kind == "crop_flip":
            if native_size != image_size:
                ops.append(T.Resize(image_size, antialias=True))
            ops += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
        elif kind == "rrc_flip":
            ops += [T.RandomResizedCrop(image_size, scale=(cfg.rrc_scale_min, 1.0), antialias=True), T.RandomHorizontalFlip()]
        elif kind == "hide_cifar":  # HiDe-Prompt's CIFAR pipeline (baselines.md §4.3)
            ops += [
                T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                T.RandomHorizontalFlip(),
                T.ColorJitter(brightness=63 / 255),
            ]
        else:
            raise DataError(f"unknown train_transform '{kind}'; choose default, none, crop_flip, rrc_flip or hide_cifar")
    else:
        if kind == "default":
            kind = "resize" if native_size <= image_size else "resize_crop"
        if kind == "resize":
            if native_size != image_size:
                ops.append(T.Resize((image_size, image_size), antialias=True))
        elif kind == "resize_crop":  # Resize(256) + CenterCrop(224) at 224 px
            ops += [T.Resize(int(round(image_size * 256 / 224)), antialias=True), T.CenterCrop(image_size)]
        else:
            raise DataError(f"unknown test_transform '{kind}'; choose default, resize or resize_crop")
    ops.append(T.ToDtype(torch.float32, scale=True))
    norm = _NORMS[cfg.normalize]
    if norm is not None:
        ops.append(T.Normalize(*norm))
    return T.Compose(ops)

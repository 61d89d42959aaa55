"""Data sets and transforms.

A data set loader returns a train and a test :class:`DatasetSplit`. In-memory sets (synthetic,
CIFAR-100, Fashion-MNIST) hold uint8 tensors; folder sets (ImageNet-R, CUB-200) hold file paths
and decode on access. ``scenarios.py`` turns a split into per-task datasets.

=============  ============================================================  ====================
benchmark      expected files (under ``benchmark.data_root``)                 train / test split
=============  ============================================================  ====================
cifar100       ``cifar-100-python/{train,test,meta}`` (torchvision's python   official
               pickles; downloaded when missing and online)
fashion_mnist  ``FashionMNIST/raw/*-ubyte[.gz]`` (torchvision) or, found      official
               automatically, Debian's ``/usr/share/datasets/fashion-mnist``
               (apt package ``dataset-fashion-mnist``)
imagenet_r     ``imagenet-r/<wnid>/*.jpg`` (200 folders, 30,000 images)       ``random`` 80/20
                                                                              (DualPrompt/HiDe) or
                                                                              ``file`` (CODA YAML)
cub200         ``CUB_200_2011/{images.txt, image_class_labels.txt,            official
               train_test_split.txt, classes.txt, images/}``                  ``train_test_split``
=============  ============================================================  ====================

Missing or incomplete data raises :class:`DataError`, whose message names the expected layout and
where to get the files (the CLI prints it and exits with status 2). ``PROMPTCL_OFFLINE=1`` forbids
download attempts. ``benchmark.train_per_class`` / ``test_per_class`` subsample every real data
set, class-balanced, with a seed derived from ``benchmark.split_seed`` and the class id, so the
subset is the same for every run seed and method.

``DatasetInfo.extra`` is copied into the ``scenario`` block of result.json: the split used, the
image counts and a SHA-256 of the exact (file or index, label) lists used, so two results can be
checked to use the same data. See docs/data.md.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2 as T

from benchmarks.config import BenchmarkConfig, ConfigError


class DataError(RuntimeError):
    """A data set is missing or malformed; the message is one sentence for the user."""

    def __init__(self, message: str = "", *args: object) -> None:
        # A DataLoader worker re-raises our error in the main process as DataError("Caught DataError
        # in DataLoader worker process 0.\nOriginal Traceback ...\nbenchmarks.data.datasets.DataError: <ours>"):
        # keep only our sentence, so the user still reads one line.
        text = str(message)
        if text.startswith("Caught ") and "Original Traceback" in text:
            last = [ln for ln in text.splitlines() if ln.strip()][-1]
            text = last.split("DataError: ", 1)[-1]
        super().__init__(text, *args)


def image_error_reason(e: BaseException) -> str:
    """torchvision's "decode_jpeg, /path/decode_jpeg.cpp:171, Image is incomplete or truncated" -> the reason."""
    import re

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", text).rstrip(".") or type(e).__name__


def unreadable_image(path: str, e: BaseException) -> DataError:
    reason = image_error_reason(e)
    return DataError(f"cannot read image {path} ({reason}); 'python bench.py check-data -b BENCHMARK' lists every "
                     f"unreadable image of a data set")


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
        """Image ``i`` as a (3, H, W) uint8 tensor (grayscale is repeated to 3 channels)."""
        if self.images is not None:
            img = self.images[i]
        else:
            from torchvision.io import ImageReadMode, decode_image

            try:
                img = decode_image(self.paths[i], mode=ImageReadMode.RGB)
            except Exception as e:  # empty, truncated or not an image: name the file
                raise unreadable_image(self.paths[i], e) from None
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return img

    def subset(self, idx: np.ndarray) -> "DatasetSplit":
        """The samples at positions ``idx`` (same class ids and names)."""
        idx = np.asarray(idx, dtype=np.int64)
        return DatasetSplit(
            self.targets[idx],
            images=self.images[torch.from_numpy(idx)] if self.images is not None else None,
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            class_names=self.class_names,
        )


@dataclass
class DatasetInfo:
    """Facts about a data set that the result records and the transforms need."""

    name: str
    num_classes: int
    native_size: int  # typical image side in pixels (picks the default transforms)
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
    """Train split, test split and facts of benchmark ``cfg.name`` (subsampled per class)."""
    if cfg.name not in _DATASETS:
        raise DataError(f"unknown benchmark '{cfg.name}'; available benchmarks: {', '.join(list_datasets())}")
    if cfg.name != "imagenet_r" and cfg.split != "default":
        raise ConfigError(f"benchmark.split={cfg.split} applies to imagenet_r only; {cfg.name} uses its official split")
    return _DATASETS[cfg.name](cfg, image_size)


# --- shared helpers ------------------------------------------------------------------------

def offline() -> bool:
    """True when the environment variable ``PROMPTCL_OFFLINE`` forbids download attempts."""
    return os.environ.get("PROMPTCL_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def list_sha256(entries: Iterable[Tuple[str, int]]) -> str:
    """SHA-256 of a (name, label) list in the given order: one ``name<TAB>label`` line each."""
    h = hashlib.sha256()
    for name, label in entries:
        h.update(f"{name}\t{int(label)}\n".encode())
    return h.hexdigest()


def per_class_indices(targets: np.ndarray, per_class: Optional[int], seed: int, tag: str) -> np.ndarray:
    """Positions of at most ``per_class`` samples of every class, chosen without replacement.

    Class ``c`` draws with ``np.random.default_rng([seed, c, hash(tag)])``, so the subset of a
    class does not depend on which other classes exist and is the same for every run seed and
    method. Positions are returned in increasing order (the data set's own order).
    """
    if not per_class:
        return np.arange(len(targets))
    if per_class < 1:
        raise ConfigError(f"benchmark.{tag}_per_class must be positive, got {per_class}")
    tag_id = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "little")
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(idx) > per_class:
            idx = np.random.default_rng([seed, int(c), tag_id]).choice(idx, per_class, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def pretrain_holdout_indices(targets: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Positions (sorted) of the training images held out for in-domain pretraining.

    ``per_class`` images of every class (all of a smaller class), drawn like
    :func:`per_class_indices` under the tag ``pretrain``; :func:`finish_splits` removes exactly
    these from the CL stream and ``methods/pretrain.py`` trains on exactly these.
    """
    if per_class < 0:
        raise ConfigError(f"benchmark.pretrain_holdout must be 0 or positive, got {per_class}")
    return per_class_indices(targets, per_class, seed, "pretrain") if per_class else np.zeros(0, dtype=np.int64)


def finish_splits(cfg: BenchmarkConfig, train: DatasetSplit, test: DatasetSplit, info: DatasetInfo,
                  train_ids: Sequence[str], test_ids: Sequence[str]) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    """Subsample per class and record the image counts and the SHA-256 of the used lists.

    ``train_ids`` / ``test_ids`` name every sample of the full splits (a relative file path, or
    ``"train/17"`` for in-memory sets); the hash covers the kept samples with their labels.
    """
    out = []
    rest = np.arange(len(train))
    if cfg.pretrain_holdout:  # the in-domain pretraining pool leaves the CL stream before subsampling
        held = pretrain_holdout_indices(train.targets, cfg.pretrain_holdout, cfg.split_seed)
        rest = np.setdiff1d(rest, held)
        info.extra["pretrain_holdout_images"] = int(len(held))
        info.extra["pretrain_holdout_list_sha256"] = list_sha256((train_ids[i], train.targets[i]) for i in held)
    for split, ids, n, key in ((train, train_ids, cfg.train_per_class, "train"), (test, test_ids, cfg.test_per_class, "test")):
        if key == "train" and len(rest) < len(train):
            if len(np.unique(train.targets[rest])) < len(np.unique(train.targets)):
                raise ConfigError(f"benchmark.pretrain_holdout={cfg.pretrain_holdout} leaves a class without training images")
            idx = rest[per_class_indices(train.targets[rest], n, cfg.split_seed, key)]
        else:
            idx = per_class_indices(split.targets, n, cfg.split_seed, key)
        info.extra[f"{key}_images"] = int(len(idx))
        info.extra[f"{key}_list_sha256"] = list_sha256((ids[i], split.targets[i]) for i in idx)
        out.append(split if len(idx) == len(split) else split.subset(idx))
    for split in out:
        _refuse_empty_files(split)
    return out[0], out[1], info


CHECK_EMPTY_FILES = True  # check-data turns it off: it lists every unreadable image instead


def _refuse_empty_files(split: DatasetSplit) -> None:
    """A zero-byte image file is found at start-up (one stat per file), not at task 8 of 10."""
    if split.paths is None or not CHECK_EMPTY_FILES:
        return
    empty = [p for p in split.paths if os.path.getsize(p) == 0] if split.paths else []
    if empty:
        more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise DataError(f"image {empty[0]}{more} is empty (0 bytes); 'python bench.py check-data -b BENCHMARK' lists "
                        f"every unreadable image")


def check_data(cfg: BenchmarkConfig, progress: bool = True) -> Tuple[str, List[Tuple[str, str]]]:
    """``bench.py check-data``: load the whole data set (no per-class subsampling) and decode every image.

    Returns (a one-line summary, [(path, reason)] of the unreadable images).
    """
    import dataclasses

    global CHECK_EMPTY_FILES
    full = dataclasses.replace(cfg, train_per_class=None, test_per_class=None)
    CHECK_EMPTY_FILES = False
    try:
        train, test, info = load_dataset(full, cfg.image_size or 224)
    finally:
        CHECK_EMPTY_FILES = True
    where = info.extra.get("data_path") or cfg.data_root
    if train.paths is None and test.paths is None:
        md5 = info.extra.get("files_md5_ok")
        md5_text = "" if md5 is None else f"; files match the official MD5s: {'yes' if md5 else 'no'}"
        return (f"{cfg.name}: {len(train) + len(test)} images held in memory, all decoded when loaded from "
                f"{where}{md5_text}"), []
    n, bad = verify_images([("train", train), ("test", test)], progress)
    return f"{cfg.name}: {n - len(bad)} of {n} images under {where} open", bad


def verify_images(splits: Sequence[Tuple[str, DatasetSplit]], progress: bool = True) -> Tuple[int, List[Tuple[str, str]]]:
    """Decode every image of file-based splits; returns (images checked, [(path, reason)]) of the unreadable ones."""
    from torchvision.io import ImageReadMode, decode_image
    from tqdm import tqdm

    todo = [(name, p) for name, sp in splits if sp.paths is not None for p in sp.paths]
    bad: List[Tuple[str, str]] = []
    for _, path in tqdm(todo, desc="check-data", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            img = decode_image(path, mode=ImageReadMode.RGB)
            if img.ndim != 3 or img.shape[-1] == 0 or img.shape[-2] == 0:
                raise ValueError(f"decoded to shape {tuple(img.shape)}")
        except Exception as e:
            bad.append((path, image_error_reason(e)))
    return len(todo), bad


def _missing(what: str, layout: str, source: str, detail: str = "") -> DataError:
    detail = f" ({detail})" if detail else ""
    return DataError(f"{what} not found{detail}: expected {layout}; get it from {source}")


# --- synthetic -----------------------------------------------------------------------------

@register_dataset("synthetic", default_tasks=5)
def load_synthetic(cfg: BenchmarkConfig, image_size: int) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    """Procedural classes (``benchmarks/data/synthetic.py``), namespace 'cl', disjoint from pretraining."""
    from benchmarks.data.synthetic import make_synthetic

    n_cls = cfg.num_classes or 10
    size = image_size
    xtr, ytr = make_synthetic(range(n_cls), cfg.train_per_class or 100, size, "cl", "train")
    xte, yte = make_synthetic(range(n_cls), cfg.test_per_class or 50, size, "cl", "test")
    names = [f"syn{c}" for c in range(n_cls)]
    info = DatasetInfo("synthetic", n_cls, size, 5, "procedural (benchmarks/data/synthetic.py), no download")
    return (
        DatasetSplit(ytr.numpy(), images=xtr, class_names=names),
        DatasetSplit(yte.numpy(), images=xte, class_names=names),
        info,
    )


# --- CIFAR-100 -----------------------------------------------------------------------------

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers, strings, numbers and numpy arrays only: a pickle that names any other
    callable (``os.system``, ``builtins.eval``, ...) is refused before anything runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file has no reason to call; refused")


def _read_cifar_pickle(path: Path) -> dict:
    # The python version of CIFAR is a pickle of a dict with bytes keys (read as latin1, like
    # torchvision). We read it here instead of through torchvision.datasets.CIFAR100, whose
    # constructor insists on the official MD5s (those are recorded instead: files_md5_ok), and with
    # a restricted unpickler, so that a planted file cannot run code whatever its MD5.
    with open(path, "rb") as f:
        return _ArraysOnlyUnpickler(f, encoding="latin1").load()


def _remove_created(before: Dict[Path, bool]) -> None:
    """After a failed download: remove the files and folders it created (they did not exist before)."""
    import shutil

    for path, existed in sorted(before.items(), key=lambda kv: len(kv[0].parts)):
        if existed or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except OSError:
                pass


@register_dataset("cifar100", default_tasks=10)
def load_cifar100(cfg: BenchmarkConfig, image_size: int) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    """Split CIFAR-100 from torchvision's python pickles ``<data_root>/cifar-100-python``.

    Missing files are downloaded with torchvision (unless ``PROMPTCL_OFFLINE``); a failed
    download or unreadable files are a :class:`DataError`. Whether the files match the official
    MD5s is recorded (``files_md5_ok``), not enforced, so hand-made files in the same format load.
    """
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import check_integrity

    root = Path(cfg.data_root)
    folder = root / CIFAR100.base_folder
    layout = f"{folder}/{{train,test,meta}} (the CIFAR-100 python version)"
    files = [folder / n for n in ("train", "test", "meta")]
    if not all(f.is_file() for f in files):
        if offline():
            raise _missing("CIFAR-100", layout, CIFAR100_URL, "downloads are disabled by PROMPTCL_OFFLINE")
        before = {q: q.exists() for q in (root, folder, root / CIFAR100.filename)}
        try:
            CIFAR100(str(root), train=True, download=True)
        except Exception as e:  # no network, a full disk, a broken archive
            _remove_created(before)
            raise _missing("CIFAR-100", layout, CIFAR100_URL, f"the download failed with {type(e).__name__}") from None
    try:
        meta = _read_cifar_pickle(folder / "meta")
        names = list(meta["fine_label_names"])
        splits = []
        for part in ("train", "test"):
            d = _read_cifar_pickle(folder / part)
            data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            targets = np.asarray(d["fine_labels"], dtype=np.int64)
            if len(targets) != len(data):
                raise ValueError("data and fine_labels differ in length")
            splits.append(DatasetSplit(targets, images=torch.from_numpy(data.copy()), class_names=names))
    except Exception as e:
        raise DataError(f"CIFAR-100 files under {folder} are unreadable ({type(e).__name__}: {str(e).rstrip('.')}); "
                        f"expected {layout} from {CIFAR100_URL}") from None
    md5s = {n: m for n, m in CIFAR100.train_list + CIFAR100.test_list}
    md5s["meta"] = CIFAR100.meta["md5"]
    md5_ok = all(check_integrity(str(folder / n), m) for n, m in md5s.items())
    info = DatasetInfo("cifar100", len(names), 32, 10, CIFAR100_URL,
                       {"split": "official", "data_path": str(folder), "files_md5_ok": md5_ok})
    return finish_splits(cfg, splits[0], splits[1], info,
                         [f"train/{i}" for i in range(len(splits[0]))], [f"test/{i}" for i in range(len(splits[1]))])


# --- Fashion-MNIST -------------------------------------------------------------------------

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fashion_mnist_candidates(data_root: str | Path) -> List[Path]:
    """Folders searched for the four idx files, in order."""
    root = Path(data_root)
    return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, FASHION_MNIST_DEBIAN]


def _find_idx(folder: Path, name: str) -> Optional[Path]:
    for cand in (folder / name, folder / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def find_fashion_mnist(data_root: str | Path) -> Optional[Dict[str, Path]]:
    """The four idx files (plain or gzipped) from the first candidate folder holding all of them.

    A folder under ``data_root`` holding only some of them is an error, never a reason to use
    another copy (the system one) in its place.
    """
    for folder in fashion_mnist_candidates(data_root):
        found = {k: _find_idx(folder, n) for k, n in FASHION_MNIST_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        if any(found.values()) and folder != FASHION_MNIST_DEBIAN:
            missing = ", ".join(n for k, n in FASHION_MNIST_FILES.items() if found[k] is None)
            raise DataError(f"Fashion-MNIST in {folder} is incomplete: {missing} (or .gz) is missing; add it, or point "
                            f"--data-root at a folder that holds all four files (no other copy is used in its place)")
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (MNIST's format: big-endian header, then uint8 data), gzipped or not.

    Hand-written (a dozen lines) because torchvision's reader needs the uncompressed file on
    disk, and Debian ships the original ``.gz`` files.
    """
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path.name} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path.name} holds {data.size} values, its header says {dims}")
    return data.reshape(dims)


@register_dataset("fashion_mnist", default_tasks=5)
def load_fashion_mnist(cfg: BenchmarkConfig, image_size: int) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    """Split Fashion-MNIST (10 classes, 28 px grayscale; repeated to 3 channels on load).

    Looks in ``<data_root>/FashionMNIST/raw`` (torchvision), ``<data_root>/fashion-mnist``,
    ``<data_root>`` and Debian's ``/usr/share/datasets/fashion-mnist``; downloads with
    torchvision into the first when none holds the files (unless ``PROMPTCL_OFFLINE``).
    """
    layout = (f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
              f"(optionally .gz) in {Path(cfg.data_root) / 'FashionMNIST' / 'raw'} or {FASHION_MNIST_DEBIAN}")
    source = f"the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or {FASHION_MNIST_URL}"
    files = find_fashion_mnist(cfg.data_root)
    detail = "downloads are disabled by PROMPTCL_OFFLINE" if offline() else ""
    if files is None and not offline():
        root = Path(cfg.data_root)
        before = {q: q.exists() for q in (root, root / "FashionMNIST", root / "FashionMNIST" / "raw")}
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(cfg.data_root), train=True, download=True)
        except Exception as e:  # reported below as missing files, with where to get them
            detail = f"the download failed with {type(e).__name__}"
            _remove_created(before)  # no empty FashionMNIST/raw/ (or half a download) is left behind
        files = find_fashion_mnist(cfg.data_root)
    if files is None:
        raise _missing("Fashion-MNIST", layout, source, detail)
    users = [c.resolve() for c in fashion_mnist_candidates(cfg.data_root)[:-1]]  # the folders under --data-root
    if files["train_images"].parent == FASHION_MNIST_DEBIAN and FASHION_MNIST_DEBIAN.resolve() not in users:
        import sys

        # said loudly (and recorded as scenario.data_path): the data is not under --data-root
        print(f"note: Fashion-MNIST is not under {cfg.data_root}; using the system copy in {FASHION_MNIST_DEBIAN}",
              file=sys.stderr, flush=True)
    try:
        arrays = {k: read_idx(p) for k, p in files.items()}
        splits = []
        for part in ("train", "test"):
            x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"].astype(np.int64)
            if x.ndim != 3 or len(x) != len(y) or y.min() < 0 or y.max() > 9:
                raise ValueError(f"{part} images {x.shape} and labels {y.shape} do not match")
            splits.append(DatasetSplit(y, images=torch.from_numpy(x.copy())[:, None], class_names=FASHION_MNIST_CLASSES))
    except Exception as e:
        raise DataError(f"Fashion-MNIST files in {files['train_images'].parent} are unreadable ({e}); "
                        f"expected {layout} from {source}") from None
    h = hashlib.sha256()
    for k in FASHION_MNIST_FILES:
        h.update(arrays[k].tobytes())
    info = DatasetInfo("fashion_mnist", 10, int(splits[0].images.shape[-1]), 5, source, {
        "split": "official",
        "data_path": str(files["train_images"].parent),
        # SHA-256 of the decoded arrays (independent of gzip headers, which differ between copies)
        "content_sha256": h.hexdigest(),
    })
    return finish_splits(cfg, splits[0], splits[1], info,
                         [f"train/{i}" for i in range(len(splits[0]))], [f"test/{i}" for i in range(len(splits[1]))])


# --- ImageNet-R ----------------------------------------------------------------------------

IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
IMAGENET_R_CLASSES = 200
CODA_SPLIT_URL = "https://github.com/GT-RIPL/CODA-Prompt/tree/main/dataloaders/splits"
# SHA-256 of the split files shipped by GT-RIPL/CODA-Prompt (dataloaders/splits/, unchanged from
# 22948d2 to 6417d4f): a split file with these hashes is recorded as CODA's own.
CODA_SPLIT_SHA256 = {
    "6bcaa14ca9359915ac3a44c48ae71388146385686eb15da79a37844421a0b845": "GT-RIPL/CODA-Prompt imagenet-r_train.yaml",
    "57275ac242d68983a4f39ccb81ec34f48b1bd920b9cd79e6e8040d7c042db02a": "GT-RIPL/CODA-Prompt imagenet-r_test.yaml",
}


def imagenet_r_files(folder: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Class names (sorted wnids) and every image as (``wnid/file``, class index).

    The order is torchvision ``ImageFolder``'s (classes sorted, files sorted within a class), the
    order the DualPrompt/HiDe code splits. A folder already split by that code
    (``imagenet-r/train/<wnid>`` and ``imagenet-r/test/<wnid>``) is merged back first: sorting the
    union by (wnid, file) gives the same order as the unsplit folder.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    parts = [folder / "train", folder / "test"]
    if all(p.is_dir() for p in parts):
        entries = []
        classes = sorted({d.name for p in parts for d in p.iterdir() if d.is_dir()})
        index = {c: i for i, c in enumerate(classes)}
        for p in parts:
            for path, _ in make_dataset(str(p), {c: index[c] for c in find_classes(str(p))[0]}, IMG_EXTENSIONS,
                                        allow_empty=True):
                rel = os.path.relpath(path, p)
                entries.append((rel.replace(os.sep, "/"), index[rel.split(os.sep)[0]]))
        entries.sort(key=lambda e: (e[1], e[0]))
        return classes, entries
    classes, class_to_idx = find_classes(str(folder))
    entries = [(os.path.relpath(p, folder).replace(os.sep, "/"), c)
               for p, c in make_dataset(str(folder), class_to_idx, IMG_EXTENSIONS)]
    return classes, entries


def dualprompt_random_split(n: int, seed: int = 42, train_fraction: float = 0.8) -> Tuple[np.ndarray, np.ndarray]:
    """Train and test positions of the DualPrompt/HiDe ImageNet-R split of ``n`` images.

    The reference code (JH-LEE-KR/dualprompt-pytorch and thu-ml/HiDe-Prompt,
    ``continual_datasets/continual_datasets.py::Imagenet_R``) calls
    ``torch.utils.data.random_split(ImageFolder, [int(0.8 n), n - int(0.8 n)])`` on the *global*
    RNG right after ``torch.manual_seed(args.seed)`` in ``main.py``. ``random_split`` is
    ``randperm(n)`` cut in two; a fresh generator seeded with ``seed`` is in the same state as the
    global one after ``manual_seed(seed)``, so this reproduces it without touching global state.
    """
    n_train = int(train_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[:n_train], perm[n_train:]


def read_coda_split(path: Path) -> Tuple[List[str], List[int]]:
    """Read a CODA-Prompt split file: YAML with ``data`` (paths) and ``targets`` (class ids)."""
    import yaml

    try:
        with open(path) as f:
            d = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        data, targets = d["data"], d["targets"]
        if len(data) != len(targets) or not all(isinstance(t, int) for t in targets):
            raise ValueError("'data' and 'targets' differ in length or targets are not integers")
    except Exception as e:
        raise DataError(f"{path} is not a CODA-Prompt split file (YAML with 'data' and 'targets' lists): {e}") from None
    return [str(p) for p in data], [int(t) for t in targets]


def coda_split_files(cfg: BenchmarkConfig) -> Tuple[Path, Path]:
    """(train, test) split files: ``split_file`` is a folder holding ``imagenet-r_{train,test}.yaml``,
    or the train file (the test file is its sibling with 'train' replaced by 'test'); unset means
    ``<data_root>/imagenet-r_{train,test}.yaml``."""
    base = Path(cfg.split_file) if cfg.split_file else Path(cfg.data_root)
    if base.is_dir() or not cfg.split_file:
        return base / "imagenet-r_train.yaml", base / "imagenet-r_test.yaml"
    if "train" not in base.name:
        raise ConfigError(f"benchmark.split_file must be a folder or the train split file (its name containing 'train'), got {base}")
    i = base.name.rfind("train")
    return base, base.with_name(base.name[:i] + "test" + base.name[i + len("train"):])


@register_dataset("imagenet_r", default_tasks=10)
def load_imagenet_r(cfg: BenchmarkConfig, image_size: int) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    """Split ImageNet-R (200 classes) from ``<data_root>/imagenet-r/<wnid>/*.jpg``.

    ``benchmark.split``:

    * ``random`` (also ``default``): the seeded 80/20 split of the DualPrompt/HiDe code
      (:func:`dualprompt_random_split`, seed ``split_seed``, 42 in their configs); class ids are
      the sorted-wnid indices, as ``ImageFolder`` gives them;
    * ``file``: a CODA-Prompt split file pair (24,000 / 6,000 images); class ids are the file's
      ``targets``, so CODA's natural class order is reproduced. Each entry
      ``.../imagenet-r/<wnid>/<file>`` is looked up as ``<data_root>/imagenet-r/<wnid>/<file>``.
    """
    root = Path(cfg.data_root)
    folder = root / "imagenet-r"
    layout = f"{folder}/<wnid>/<image>.jpg with {IMAGENET_R_CLASSES} class folders"
    mode = "random" if cfg.split == "default" else cfg.split
    if mode not in ("random", "file"):
        raise ConfigError(f"unknown benchmark.split '{cfg.split}' for imagenet_r; choose random or file")
    if not folder.is_dir():
        raise _missing("ImageNet-R", layout, f"{IMAGENET_R_URL} (extract it into {root})")
    try:
        classes, entries = imagenet_r_files(folder)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"ImageNet-R under {folder} is incomplete ({str(e).splitlines()[0]}); expected {layout} "
                        f"from {IMAGENET_R_URL}") from None
    if len(classes) != IMAGENET_R_CLASSES:
        raise DataError(f"ImageNet-R under {folder} is incomplete ({len(classes)} class folders): expected {layout}; "
                        f"get it from {IMAGENET_R_URL}")
    extra: Dict[str, object] = {"split": mode, "data_path": str(folder), "num_images": len(entries)}
    if mode == "random":
        tr, te = dualprompt_random_split(len(entries), cfg.split_seed)
        tr, te = np.sort(tr), np.sort(te)
        extra["split_seed"] = cfg.split_seed
        train_e, test_e = [entries[i] for i in tr], [entries[i] for i in te]
        names = classes
    else:
        from methods.checkpoints import sha256_file

        files = coda_split_files(cfg)
        for f in files:
            if not f.is_file():
                raise DataError(f"ImageNet-R split file {f} not found; benchmark.split=file needs CODA-Prompt's "
                                f"imagenet-r_train.yaml and imagenet-r_test.yaml (from {CODA_SPLIT_URL}) in --data-root "
                                f"or benchmark.split_file")
        present = {rel for rel, _ in entries}
        wnid_of: Dict[int, str] = {}
        lists = []
        for f in files:
            data, targets = read_coda_split(f)
            rels = ["/".join(Path(p).parts[-2:]) for p in data]
            missing = [r for r in rels if r not in present]
            if missing:
                raise DataError(f"{len(missing)} images listed in {f.name} are missing under {folder} "
                                f"(e.g. {missing[0]}); expected {layout} from {IMAGENET_R_URL}")
            for r, t in zip(rels, targets):
                if wnid_of.setdefault(t, r.split("/")[0]) != r.split("/")[0]:
                    raise DataError(f"{f.name} gives class {t} to two folders ({wnid_of[t]} and {r.split('/')[0]})")
            lists.append(list(zip(rels, targets)))
        train_e, test_e = lists
        overlap = {r for r, _ in train_e} & {r for r, _ in test_e}
        if overlap:
            raise DataError(f"the train and test split files share {len(overlap)} images (e.g. {sorted(overlap)[0]})")
        n_cls = max(wnid_of) + 1
        if sorted(wnid_of) != list(range(n_cls)):
            raise DataError(f"the split files' targets are not the contiguous ids 0..{n_cls - 1}")
        names = [wnid_of[c] for c in range(n_cls)]
        shas = [sha256_file(f) for f in files]
        extra.update({
            "split_file": [str(f) for f in files],
            "split_file_sha256": shas,
            "split_file_origin": [CODA_SPLIT_SHA256.get(s, "custom") for s in shas],
        })

    moved = all((folder / d).is_dir() for d in ("train", "test"))  # already split by the DualPrompt code

    def file_of(rel: str) -> str:
        # the list names ``wnid/file``; in a folder split by the DualPrompt code the file lies in train/ or test/
        if moved:
            for d in ("train", "test"):
                if (folder / d / rel).is_file():
                    return str(folder / d / rel)
        return str(folder / rel)

    def split_of(ents: List[Tuple[str, int]]) -> DatasetSplit:
        return DatasetSplit(np.array([c for _, c in ents], dtype=np.int64),
                            paths=[file_of(rel) for rel, _ in ents], class_names=list(names))

    if not train_e or not test_e:
        raise DataError(f"ImageNet-R under {folder} has too few images for a train and a test split; expected {layout}")
    info = DatasetInfo("imagenet_r", len(names), 400, 10, IMAGENET_R_URL, extra)
    return finish_splits(cfg, split_of(train_e), split_of(test_e), info, [r for r, _ in train_e], [r for r, _ in test_e])


# --- CUB-200 -------------------------------------------------------------------------------

CUB_URL = "https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)"
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def _read_id_table(path: Path) -> Dict[int, str]:
    """``<id> <value>`` lines -> {id: value}."""
    out: Dict[int, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise DataError(f"{path} line {n} is not '<id> <value>': {line[:60]!r}")
        out[int(key)] = value.strip()
    return out


@register_dataset("cub200", default_tasks=10)
def load_cub200(cfg: BenchmarkConfig, image_size: int) -> Tuple[DatasetSplit, DatasetSplit, DatasetInfo]:
    """Split CUB-200 from the extracted ``CUB_200_2011`` folder and its official split.

    Class ids are ``image_class_labels.txt``'s (1-based) minus one, names from ``classes.txt``.
    The HiDe-Prompt code (``continual_datasets.py::CUB200``) moves the images into
    ``train/``/``test/`` class folders by ``train_test_split.txt`` and reads them with
    ``ImageFolder``; its class index (sorted ``001.Black_footed_Albatross`` ... folder names) is
    the same ``class_id - 1``.
    """
    root = Path(cfg.data_root)
    folder = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    layout = f"{root}/CUB_200_2011/ with {', '.join(CUB_FILES)} and images/<class>/<image>.jpg"
    missing = [n for n in CUB_FILES if not (folder / n).is_file()]
    if missing or not (folder / "images").is_dir():
        raise _missing("CUB-200-2011", layout, CUB_URL, f"missing {', '.join(missing) or 'images/'}")
    images = _read_id_table(folder / "images.txt")
    labels = _read_id_table(folder / "image_class_labels.txt")
    is_train = _read_id_table(folder / "train_test_split.txt")
    class_table = _read_id_table(folder / "classes.txt")
    if not (set(images) == set(labels) == set(is_train)):
        raise DataError(f"images.txt, image_class_labels.txt and train_test_split.txt under {folder} list different image ids")
    if sorted(class_table) != list(range(1, len(class_table) + 1)):
        raise DataError(f"classes.txt under {folder} does not number its classes 1..N")
    ids = sorted(images)
    absent = [images[i] for i in ids if not (folder / "images" / images[i]).is_file()]
    if absent:
        raise DataError(f"CUB-200-2011 under {folder} is incomplete ({len(absent)} of {len(ids)} images missing, "
                        f"e.g. images/{absent[0]}); get it from {CUB_URL}")
    names = [class_table[c] for c in range(1, len(class_table) + 1)]
    parts: Dict[str, List[Tuple[str, int]]] = {"1": [], "0": []}
    for i in ids:
        c = int(labels[i]) - 1
        if not 0 <= c < len(names) or is_train[i] not in parts:
            raise DataError(f"image id {i} has class {labels[i]} or split flag {is_train[i]!r} outside classes.txt / {{0,1}}")
        parts[is_train[i]].append((images[i], c))

    def split_of(ents: List[Tuple[str, int]]) -> DatasetSplit:
        return DatasetSplit(np.array([c for _, c in ents], dtype=np.int64),
                            paths=[str(folder / "images" / rel) for rel, _ in ents], class_names=names)

    info = DatasetInfo("cub200", len(names), 400, 10, CUB_URL,
                       {"split": "official train_test_split.txt", "data_path": str(folder), "num_images": len(ids)})
    return finish_splits(cfg, split_of(parts["1"]), split_of(parts["0"]), info,
                         [r for r, _ in parts["1"]], [r for r, _ in parts["0"]])


# --- transforms ----------------------------------------------------------------------------

_NORMS = {
    "none": None,  # [0,1] inputs: L2P/DualPrompt (JH-LEE ports, JAX), CODA-Prompt, SMoPE, HiDe ImageNet-R/CUB
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1,1]: what the Google / AugReg ViT weights were trained on
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DINO / iBOT / MoCo v3 pretraining
    # HiDe-Prompt's CIFAR pipeline (datasets.py::build_cifar_transform), its exact constants
    "cifar": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
TRAIN_TRANSFORMS = ("default", "none", "crop_flip", "rrc_flip", "rrc_flip_bicubic", "resize_crop_flip_bicubic", "hide_cifar")
TEST_TRANSFORMS = ("default", "resize", "resize_bicubic", "resize_crop", "resize_crop_bicubic")


def resolve_transform_names(cfg: BenchmarkConfig, image_size: int, native_size: int) -> Tuple[str, str]:
    """(train, test) transform names with ``default`` resolved.

    * train ``default``: ``crop_flip`` when the images already have the input size (the CPU quick
      profile), else ``rrc_flip`` (every reference code: RandomResizedCrop + flip);
    * test ``default``: ``resize`` when the images are no larger than the input (CIFAR,
      Fashion-MNIST: upsampled, CODA's CIFAR test transform), else ``resize_crop``
      (Resize(S*256/224) + CenterCrop(S), CODA's ImageNet-R test transform).
    """
    train, test = cfg.train_transform, cfg.test_transform
    if train == "default":
        train = "crop_flip" if native_size == image_size else "rrc_flip"
    if test == "default":
        test = "resize" if native_size <= image_size else "resize_crop"
    return train, test


def build_transform(cfg: BenchmarkConfig, image_size: int, native_size: int, train: bool) -> T.Compose:
    """uint8 (3, H, W) -> float (3, S, S) in [0,1], then ``normalize`` (default none).

    Train transforms (``benchmark.train_transform``):

    * ``none``: resize to S (bilinear) only -- deterministic, lets the protocol cache queries;
    * ``crop_flip``: resize to S, RandomCrop(S, padding S/8), horizontal flip (CIFAR-style);
    * ``rrc_flip``: RandomResizedCrop(S, scale (rrc_scale_min, 1), ratio 3/4-4/3, bilinear) +
      flip -- CODA-Prompt / SMoPE (scale 0.08, torchvision's default) and the JH-LEE L2P /
      DualPrompt ports and HiDe ImageNet-R/CUB (``rrc_scale_min=0.05``);
    * ``rrc_flip_bicubic``: the same with bicubic resizing (SLCA ImageNet-R:
      ``RandomResizedCrop(224, interpolation=3)``, scale from ``rrc_scale_min``);
    * ``resize_crop_flip_bicubic``: Resize((S·300/224)², bicubic) + RandomCrop(S) + flip (SLCA CUB:
      ``Resize((300, 300), interpolation=3)``, ``RandomCrop((224, 224))``);
    * ``hide_cifar``: HiDe-Prompt's CIFAR pipeline, RandomResizedCrop(S, bicubic, scale
      (0.08, 1) -- the code defines 0.05 but does not pass it), flip, ColorJitter(brightness
      63/255); pair it with ``normalize: cifar`` and ``test_transform: resize_crop_bicubic``.

    Test transforms (``benchmark.test_transform``):

    * ``resize``: Resize((S, S)), bilinear (CODA-Prompt / SMoPE / VQ-Prompt CIFAR: the ``coda``
      presets and coda_prompt / smope / vq_prompt ``paper``);
    * ``resize_bicubic``: the same with bicubic resizing (RanPAC's CIFAR ``Resize(224, BICUBIC)`` +
      ``CenterCrop(224)``, which on square images is this: the ranpac ``paper`` preset);
    * ``resize_crop``: Resize(int(S*256/224)) + CenterCrop(S), bilinear (CODA-Prompt ImageNet-R,
      SMoPE / VQ-Prompt ImageNet-R and CUB-200: the same presets);
    * ``resize_crop_bicubic``: the same with bicubic resizing (l2p-pytorch, dualprompt-pytorch and
      HiDe-Prompt ``Resize(256, interpolation=3)``, every set: the l2p, dualprompt and hide_prompt
      ``paper`` presets; HiDe's class statistics use it too).

    Resizing runs on uint8 tensors with antialiasing, which approximates (is not bit-equal to)
    the PIL resizing of the reference codes.
    """
    if cfg.normalize not in _NORMS:
        raise ConfigError(f"unknown normalize '{cfg.normalize}'; choose one of {', '.join(_NORMS)}")
    train_kind, test_kind = resolve_transform_names(cfg, image_size, native_size)
    ops: List[object] = []
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        kind = train_kind
        if kind == "none":
            if native_size != image_size:
                ops.append(T.Resize((image_size, image_size), antialias=True))
        elif kind == "crop_flip":
            if native_size != image_size:
                ops.append(T.Resize((image_size, image_size), antialias=True))
            ops += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
        elif kind == "rrc_flip":
            ops += [T.RandomResizedCrop(image_size, scale=(cfg.rrc_scale_min, 1.0), antialias=True), T.RandomHorizontalFlip()]
        elif kind == "rrc_flip_bicubic":
            ops += [T.RandomResizedCrop(image_size, scale=(cfg.rrc_scale_min, 1.0), interpolation=bicubic, antialias=True),
                    T.RandomHorizontalFlip()]
        elif kind == "resize_crop_flip_bicubic":
            big = round(image_size * 300 / 224)
            ops += [T.Resize((big, big), interpolation=bicubic, antialias=True), T.RandomCrop(image_size),
                    T.RandomHorizontalFlip()]
        elif kind == "hide_cifar":
            ops += [
                T.RandomResizedCrop(image_size, interpolation=bicubic, antialias=True),
                T.RandomHorizontalFlip(),
                T.ColorJitter(brightness=63 / 255),
            ]
        else:
            raise ConfigError(f"unknown train_transform '{kind}'; choose one of {', '.join(TRAIN_TRANSFORMS)}")
    else:
        kind = test_kind
        if kind == "resize":
            ops.append(T.Resize((image_size, image_size), antialias=True))
        elif kind == "resize_bicubic":
            ops.append(T.Resize((image_size, image_size), interpolation=bicubic, antialias=True))
        elif kind in ("resize_crop", "resize_crop_bicubic"):
            interp = bicubic if kind == "resize_crop_bicubic" else T.InterpolationMode.BILINEAR
            ops += [T.Resize(int(image_size * 256 / 224), interpolation=interp, antialias=True), T.CenterCrop(image_size)]
        else:
            raise ConfigError(f"unknown test_transform '{kind}'; choose one of {', '.join(TEST_TRANSFORMS)}")
    ops.append(T.ToDtype(torch.float32, scale=True))
    norm = _NORMS[cfg.normalize]
    if norm is not None:
        ops.append(T.Normalize(*norm))
    return T.Compose(ops)

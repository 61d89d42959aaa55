"""Defects 5 and 6: an unreadable image is named in one sentence (found up front by check-data and,
for empty files, at start-up); Fashion-MNIST is read only from where the user pointed, and a failed
download leaves no empty folder behind."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.data.datasets as D
from tests.faults.helpers import cli, one_sentence, snapshot
from conftest import write_cub_layout

CUB_SET = ["backbone.pretrained=none", "benchmark.num_tasks=4", "benchmark.class_order=natural", "train.epochs=1",
           "train.batch_size=16", "train.eval_batch_size=64"]


@pytest.fixture(scope="module")
def cub_template(tmp_path_factory) -> Path:
    """A CUB-200 layout: 200 classes x 3 tiny JPEGs (2 train, 1 test)."""
    from torchvision.io import encode_jpeg

    def jpeg(i: int, c: int) -> bytes:
        img = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        return bytes(encode_jpeg(img, quality=95).numpy())

    return write_cub_layout(tmp_path_factory.mktemp("cub"), jpeg)

@pytest.fixture
def cub(cub_template, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(cub_template, root)
    return root


def _img(root: Path, c: int, k: int) -> Path:
    return root / "CUB_200_2011" / "images" / f"{c:03d}.Bird_{c}" / f"Bird_{c}_{k:04d}.jpg"


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_jpeg_in_the_last_task_is_named_in_one_sentence(cub, tmp_path, capsys, workers):
    bad = _img(cub, 200, 0)  # class 200 (natural order): trained in task 4 of 4
    _truncate(bad)
    out = tmp_path / "runs"
    code, err, _ = cli(["run", "-b", "cub200", "-m", "linear_probe", "--data-root", str(cub), "--out", str(out),
                        "--device", "cpu", "--quiet", "--set", *CUB_SET, f"train.num_workers={workers}"], capsys)
    assert code == 2 and one_sentence(err), err
    assert err.startswith(f"error: cannot read image {bad} (Image is incomplete or truncated); "
                          f"'python bench.py check-data -b BENCHMARK' lists every unreadable image"), err
    d = out / "cub200-4t" / "linear_probe" / "seed0"
    assert not (d / "result.json").exists() and '"status": "failed"' in (d / "status.json").read_text()
    assert "task 3/4 eval" in (d / "log.txt").read_text()  # three tasks were done: it was found mid-run


def test_an_empty_image_is_refused_at_start_and_check_data_lists_every_bad_image(cub, tmp_path, capsys):
    empty, truncated = _img(cub, 7, 1), _img(cub, 150, 2)
    empty.write_bytes(b"")
    _truncate(truncated)
    out = tmp_path / "runs"
    code, err, _ = cli(["run", "-b", "cub200", "-m", "linear_probe", "--data-root", str(cub), "--out", str(out),
                        "--device", "cpu", "--quiet", "--set", *CUB_SET], capsys)
    assert code == 2 and one_sentence(err), err
    assert f"image {empty} is empty (0 bytes)" in err and not out.exists()

    code, err, stdout = cli(["check-data", "-b", "cub200", "--data-root", str(cub)], capsys)
    assert code == 2 and one_sentence(err), err
    assert err == "error: 2 images of cub200 cannot be read (listed above); replace or remove them before a run."
    assert stdout.splitlines() == [
        f"unreadable: {empty} (Expected a non empty file)",
        f"unreadable: {truncated} (Image is incomplete or truncated)",
        f"cub200: 598 of 600 images under {cub / 'CUB_200_2011'} open",
    ]


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fashion(folder: Path, skip: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", 20), ("t10k", 10)):
        for kind, arr in (("images-idx3", np.zeros((n, 28, 28), np.uint8)), ("labels-idx1", np.arange(n) % 10)):
            name = f"{part}-{kind}-ubyte"
            if name != skip:
                (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(arr)))


def test_a_partial_fashion_mnist_under_data_root_is_not_replaced_by_the_system_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")
    system = tmp_path / "usr-share-fashion-mnist"
    _fashion(system)  # a complete system copy
    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", system)
    data = tmp_path / "data"
    _fashion(data / "FashionMNIST" / "raw", skip="t10k-labels-idx1-ubyte")
    out = tmp_path / "runs"
    code, err, _ = cli(["run", "-b", "fashion_mnist", "-m", "ncm", "--data-root", str(data), "--out", str(out),
                        "--device", "cpu", "--quiet", "--set", "backbone.pretrained=none"], capsys)
    assert code == 2 and one_sentence(err), err
    assert f"Fashion-MNIST in {data / 'FashionMNIST' / 'raw'} is incomplete: t10k-labels-idx1-ubyte (or .gz) is missing" in err
    assert not out.exists()


def test_the_system_copy_is_used_only_when_data_root_has_none_and_then_said_loudly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")
    system = tmp_path / "usr-share-fashion-mnist"
    _fashion(system)
    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", system)
    train, test, info = D.load_dataset(D.BenchmarkConfig(name="fashion_mnist", data_root=str(tmp_path / "empty")), 32)
    assert info.extra["data_path"] == str(system) and len(train) == 20
    assert capsys.readouterr().err.strip() == (f"note: Fashion-MNIST is not under {tmp_path / 'empty'}; using the "
                                               f"system copy in {system}")
    D.load_dataset(D.BenchmarkConfig(name="fashion_mnist", data_root=str(system)), 32)  # pointed at it: no note
    assert capsys.readouterr().err == ""


def test_a_failed_fashion_mnist_download_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    monkeypatch.delenv("PROMPTCL_OFFLINE", raising=False)
    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", tmp_path / "no-system-copy")

    class OfflineFashionMNIST:  # what torchvision does without network: makes raw/, then the fetch fails
        def __init__(self, root, train=True, download=False):
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", OfflineFashionMNIST)
    data = tmp_path / "data"
    data.mkdir()
    before = snapshot(tmp_path)
    code, err, _ = cli(["run", "-b", "fashion_mnist", "-m", "ncm", "--data-root", str(data), "--out",
                        str(tmp_path / "runs"), "--device", "cpu", "--quiet", "--set", "backbone.pretrained=none"], capsys)
    assert code == 2 and one_sentence(err) and "the download failed with RuntimeError" in err, err
    assert snapshot(tmp_path) == before and list(data.iterdir()) == []

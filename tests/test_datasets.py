"""Real data sets on tiny copies of their on-disk layouts: CIFAR-100 python pickles, ImageNet-R
class folders (random and CODA-file splits), CUB-200-2011 files, Fashion-MNIST idx files;
per-class subsampling, transforms, and clear errors for missing or incomplete data. No network.
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
import random
import shutil
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
import yaml

from benchmarks.config import BenchmarkConfig, ConfigError
from benchmarks.data.datasets import DataError, build_transform, load_dataset, resolve_transform_names
from benchmarks.data.scenarios import build_scenario
from conftest import write_cub_layout


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")


def _cfg(name: str, root: Path, **kw) -> BenchmarkConfig:
    return BenchmarkConfig(name=name, data_root=str(root), **kw)


# --- CIFAR-100 -----------------------------------------------------------------------------

def _cifar_image(i: int, label: int) -> np.ndarray:
    """Row of CIFAR's ``data`` array: 1024 red, 1024 green, 1024 blue values (red + 256 * blue is
    the position ``i``, green the label)."""
    return np.concatenate([np.full(1024, i % 256), np.full(1024, label), np.full(1024, i // 256)]).astype(np.uint8)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    for part, per in (("train", 3), ("test", 2)):
        labels = [c for c in range(100) for _ in range(per)]
        rng = random.Random(part)
        rng.shuffle(labels)  # the real files are not sorted by class
        data = np.stack([_cifar_image(i, c) for i, c in enumerate(labels)])
        d = {"filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": f"{part} batch",
             "fine_labels": labels, "coarse_labels": [c // 5 for c in labels], "data": data}
        with open(folder / part, "wb") as f:
            pickle.dump(d, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c:03d}" for c in range(100)],
                     "coarse_label_names": [f"super{c}" for c in range(20)]}, f)
    return root


def test_cifar100_pickles_load_with_labels_and_pixels(cifar_root):
    train, test, info = load_dataset(_cfg("cifar100", cifar_root), 32)
    assert (len(train), len(test), info.num_classes) == (300, 200, 100)
    assert np.bincount(train.targets).tolist() == [3] * 100
    assert train.class_names[42] == "class042"
    for i in (0, 17, 299):
        img = train.load(i)
        assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
        assert img[0].unique().tolist() == [i % 256]
        assert img[1].unique().tolist() == [int(train.targets[i])]
        assert img[2].unique().tolist() == [i // 256]
    assert info.extra["files_md5_ok"] is False  # hand-made files, not the official ones


def test_cifar100_scenario_remaps_labels_in_task_order(cifar_root):
    sc = build_scenario(_cfg("cifar100", cifar_root, num_tasks=10), seed=3, image_size=32)
    order = list(range(100))
    random.Random(3).shuffle(order)  # the 'seeded' class order
    assert sc.order == order
    for t, ds in enumerate(sc.train_sets):
        assert len(ds) == 30 and len(sc.test_sets[t]) == 20
        assert sorted(set(ds.labels.tolist())) == list(range(10 * t, 10 * t + 10))
        for k in (0, 29):
            original = int(ds.split.targets[ds.indices[k]])
            assert ds.labels[k] == order.index(original)


def test_per_class_subsampling_is_seeded_and_balanced(cifar_root):
    a, ta, info = load_dataset(_cfg("cifar100", cifar_root, train_per_class=2, test_per_class=1), 32)
    b, _, _ = load_dataset(_cfg("cifar100", cifar_root, train_per_class=2, test_per_class=1), 32)
    c, _, _ = load_dataset(_cfg("cifar100", cifar_root, train_per_class=2, split_seed=7), 32)
    assert np.bincount(a.targets).tolist() == [2] * 100 and np.bincount(ta.targets).tolist() == [1] * 100
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert info.extra["train_images"] == 200 and info.extra["test_images"] == 100
    # every kept image is one of its class's originals, in the original order
    full, _, _ = load_dataset(_cfg("cifar100", cifar_root), 32)
    pos = [int(a.images[i, 0, 0, 0]) + 256 * int(a.images[i, 2, 0, 0]) for i in range(len(a))]
    assert pos == sorted(pos) and len(set(pos)) == 200
    assert all(full.targets[p] == a.targets[i] for i, p in enumerate(pos))


def test_cifar100_missing_is_one_sentence_naming_layout_and_source(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(_cfg("cifar100", tmp_path), 32)
    msg = str(e.value)
    assert f"{tmp_path}/cifar-100-python/{{train,test,meta}}" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert "\n" not in msg


# --- ImageNet-R ----------------------------------------------------------------------------

def _jpeg(value: int) -> bytes:
    from torchvision.io import encode_jpeg

    img = torch.full((3, 12, 10), value, dtype=torch.uint8)
    return bytes(encode_jpeg(img, quality=95).numpy())


WNIDS = [f"n{1000000 + 7 * c:08d}" for c in range(200)]


def _make_imagenet_r(root: Path) -> List[str]:
    """200 class folders with 3-6 JPEGs each (a solid grey level per class); returns rel paths."""
    folder = root / "imagenet-r"
    rels = []
    for c, w in enumerate(WNIDS):
        (folder / w).mkdir(parents=True)
        data = _jpeg(c)
        for k in range(3 + c % 4):
            name = f"{['art', 'sketch', 'toy'][k % 3]}_{k}.jpg"
            (folder / w / name).write_bytes(data)
            rels.append(f"{w}/{name}")
    return rels


@pytest.fixture(scope="module")
def imr_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imr")
    _make_imagenet_r(root)
    return root


def _reference_random_split(folder: Path, seed: int) -> Tuple[set, set]:
    """The DualPrompt/HiDe procedure verbatim: ImageFolder, global seed, random_split 80/20."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder))
    n = len(ds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tr, te = torch.utils.data.random_split(ds, [int(0.8 * n), n - int(0.8 * n)])
    rel = lambda i: "/".join(Path(ds.imgs[i][0]).parts[-2:])  # noqa: E731
    return {rel(i) for i in tr.indices}, {rel(i) for i in te.indices}


def _rels(split) -> set:
    return {"/".join(Path(p).parts[-2:]) for p in split.paths}


def test_imagenet_r_random_split_reproduces_dualprompt(imr_root):
    train, test, info = load_dataset(_cfg("imagenet_r", imr_root, split="random"), 32)
    n = 200 * 3 + sum(c % 4 for c in range(200))
    assert len(train) == int(0.8 * n) and len(test) == n - int(0.8 * n)
    ref_tr, ref_te = _reference_random_split(imr_root / "imagenet-r", 42)
    assert _rels(train) == ref_tr and _rels(test) == ref_te
    # labels are the sorted-wnid index, and the pixels are the class's grey level
    for i in (0, len(train) - 1):
        wnid = Path(train.paths[i]).parent.name
        assert train.targets[i] == WNIDS.index(wnid) and train.class_names[train.targets[i]] == wnid
        assert abs(int(train.load(i).float().mean()) - WNIDS.index(wnid)) <= 2
    assert info.num_classes == 200
    assert info.extra["split"] == "random" and info.extra["split_seed"] == 42
    lines = "".join(f"{'/'.join(Path(p).parts[-2:])}\t{t}\n" for p, t in zip(train.paths, train.targets))
    assert info.extra["train_list_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    again, _, _ = load_dataset(_cfg("imagenet_r", imr_root), 32)  # 'default' is the random split
    assert again.paths == train.paths
    other, _, info7 = load_dataset(_cfg("imagenet_r", imr_root, split_seed=7), 32)
    assert _rels(other) == _reference_random_split(imr_root / "imagenet-r", 7)[0] != ref_tr
    assert info7.extra["train_list_sha256"] != info.extra["train_list_sha256"]


def test_imagenet_r_folder_already_split_by_dualprompt_code(tmp_path, imr_root):
    """Their code moves the images into imagenet-r/{train,test}/<wnid>; the same split results."""
    root = tmp_path / "moved"
    shutil.copytree(imr_root / "imagenet-r", root / "imagenet-r")
    ref_tr, ref_te = _reference_random_split(root / "imagenet-r", 42)
    for part, rels in (("train", ref_tr), ("test", ref_te)):
        for rel in rels:
            dst = root / "imagenet-r" / part / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(root / "imagenet-r" / rel, dst)
    train, test, _ = load_dataset(_cfg("imagenet_r", root), 32)
    assert _rels(train) == ref_tr and _rels(test) == ref_te


def _write_coda_split(path: Path, rels: List[str], targets: List[int]) -> None:
    path.write_text(yaml.safe_dump({"data": [f"data/imagenet-r/{r}" for r in rels], "targets": targets}))


def test_imagenet_r_file_split_reads_the_coda_format(tmp_path, imr_root):
    perm = list(range(200))
    random.Random(5).shuffle(perm)  # CODA's ids are not the sorted-wnid index
    coda_id = {w: perm[c] for c, w in enumerate(WNIDS)}
    rels = sorted(str(p.relative_to(imr_root / "imagenet-r")) for p in (imr_root / "imagenet-r").rglob("*.jpg"))
    tr = [r for i, r in enumerate(rels) if i % 5]
    te = [r for i, r in enumerate(rels) if not i % 5]
    splits = tmp_path / "splits"
    splits.mkdir()
    _write_coda_split(splits / "imagenet-r_train.yaml", tr, [coda_id[r.split("/")[0]] for r in tr])
    _write_coda_split(splits / "imagenet-r_test.yaml", te, [coda_id[r.split("/")[0]] for r in te])
    for split_file in (splits, splits / "imagenet-r_train.yaml"):  # a folder, or the train file
        train, test, info = load_dataset(_cfg("imagenet_r", imr_root, split="file", split_file=str(split_file)), 32)
        assert ["/".join(Path(p).parts[-2:]) for p in train.paths] == tr and len(test) == len(te)
        assert all(train.targets[i] == coda_id[tr[i].split("/")[0]] for i in range(len(tr)))
        assert all(train.class_names[coda_id[w]] == w for w in WNIDS)
        assert info.extra["split"] == "file" and info.extra["split_file_origin"] == ["custom", "custom"]
        assert info.extra["split_file_sha256"][0] == hashlib.sha256((splits / "imagenet-r_train.yaml").read_bytes()).hexdigest()
    # CODA's natural order (seed 0) follows the file's ids
    sc = build_scenario(_cfg("imagenet_r", imr_root, split="file", split_file=str(splits), class_order="coda", num_tasks=10),
                        seed=0, image_size=32)
    assert sc.order == list(range(200)) and sc.describe()["split"] == "file"
    assert sc.class_names[0] == WNIDS[perm.index(0)]


def test_imagenet_r_file_split_errors(tmp_path, imr_root):
    with pytest.raises(DataError, match=r"imagenet-r_train.yaml not found; .*github.com/GT-RIPL/CODA-Prompt"):
        load_dataset(_cfg("imagenet_r", imr_root, split="file"), 32)
    splits = tmp_path / "s"
    splits.mkdir()
    _write_coda_split(splits / "imagenet-r_train.yaml", [f"{WNIDS[0]}/art_0.jpg", f"{WNIDS[1]}/nope.jpg"], [0, 1])
    _write_coda_split(splits / "imagenet-r_test.yaml", [f"{WNIDS[0]}/sketch_1.jpg"], [0])
    with pytest.raises(DataError, match=rf"1 images listed in imagenet-r_train.yaml are missing .*e.g. {WNIDS[1]}/nope.jpg"):
        load_dataset(_cfg("imagenet_r", imr_root, split="file", split_file=str(splits)), 32)
    with pytest.raises(ConfigError, match="choose random or file"):
        load_dataset(_cfg("imagenet_r", imr_root, split="tfds"), 32)


def test_imagenet_r_incomplete_folder(tmp_path, imr_root):
    root = tmp_path / "inc"
    shutil.copytree(imr_root / "imagenet-r", root / "imagenet-r")
    shutil.rmtree(root / "imagenet-r" / WNIDS[3])
    with pytest.raises(DataError, match=r"incomplete \(199 class folders\).*imagenet-r.tar"):
        load_dataset(_cfg("imagenet_r", root), 32)


# --- CUB-200 -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    return write_cub_layout(tmp_path_factory.mktemp("cub"), lambda i, c: _jpeg(c))


def test_cub200_official_split_and_labels(cub_root):
    train, test, info = load_dataset(_cfg("cub200", cub_root), 32)
    assert (len(train), len(test), info.num_classes) == (400, 200, 200)
    assert np.bincount(train.targets).tolist() == [2] * 200 and np.bincount(test.targets).tolist() == [1] * 200
    assert all(Path(p).name.endswith("_0002.jpg") for p in test.paths)
    i = 123
    c = int(Path(train.paths[i]).parent.name.split(".")[0])
    assert train.targets[i] == c - 1 and train.class_names[c - 1] == f"{c:03d}.Bird_{c}"
    assert abs(int(train.load(i).float().mean()) - c) <= 2
    sc = build_scenario(_cfg("cub200", cub_root, num_tasks=10, class_order="natural"), seed=0, image_size=32)
    assert [len(d) for d in sc.train_sets] == [40] * 10 and sc.train_sets[0][0][0].shape == (3, 32, 32)


def test_cub200_missing_image_is_reported(tmp_path, cub_root):
    root = tmp_path / "c"
    shutil.copytree(cub_root, root)
    (root / "CUB_200_2011" / "images" / "005.Bird_5" / "Bird_5_0001.jpg").unlink()
    with pytest.raises(DataError, match=r"incomplete \(1 of 600 images missing, e.g. images/005.Bird_5/Bird_5_0001.jpg\)"):
        load_dataset(_cfg("cub200", root), 32)


# --- Fashion-MNIST (hand-made idx files; the real files are in test_fashion_mnist.py) --------

def _idx(array: np.ndarray) -> bytes:
    """MNIST's idx format: 0, 0, type 0x08 (uint8), ndim, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("sub,gz", [("FashionMNIST/raw", False), ("FashionMNIST/raw", True), (".", True)])
def test_fashion_mnist_torchvision_and_debian_layouts(tmp_path, monkeypatch, sub, gz):
    """torchvision's ``FashionMNIST/raw`` (plain or .gz) and Debian's flat folder of .gz files."""
    import benchmarks.data.datasets as D

    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    raw = (tmp_path / sub).resolve()
    raw.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", 40), ("t10k", 20)):
        y = np.arange(n) % 10
        x = np.zeros((n, 28, 28), np.uint8)
        x[:, 0, 0] = np.arange(n)  # image id in the corner
        x[:, 5:9, 5:9] = (y * 20)[:, None, None]
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            data = _idx(arr)
            name = f"{part}-{kind}-ubyte"
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    train, test, info = load_dataset(_cfg("fashion_mnist", tmp_path, train_per_class=3), 32)
    assert info.extra["data_path"] == str(raw)
    assert len(train) == 30 and len(test) == 20 and np.bincount(train.targets).tolist() == [3] * 10
    img = train.load(4)
    assert img.shape == (3, 28, 28) and torch.equal(img[0], img[2])
    assert int(img[0, 6, 6]) == 20 * int(train.targets[4]) and int(img[0, 0, 0]) % 10 == train.targets[4]
    tf = build_transform(_cfg("fashion_mnist", tmp_path), 32, 28, train=False)
    assert tf(img).shape == (3, 32, 32)


def test_fashion_mnist_truncated_file_is_a_data_error(tmp_path, monkeypatch):
    import benchmarks.data.datasets as D

    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    for part, n in (("train", 20), ("t10k", 10)):
        (tmp_path / f"{part}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))
        images = _idx(np.zeros((n, 28, 28), np.uint8))
        (tmp_path / f"{part}-images-idx3-ubyte").write_bytes(images[: len(images) - 100] if part == "train" else images)
    with pytest.raises(DataError, match=r"unreadable \(train-images-idx3-ubyte holds 15580 values, its header says \[20, 28, 28\]\)"):
        load_dataset(_cfg("fashion_mnist", tmp_path), 32)


def test_fashion_mnist_missing_names_both_locations(tmp_path, monkeypatch):
    import benchmarks.data.datasets as D

    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    with pytest.raises(DataError) as e:
        load_dataset(_cfg("fashion_mnist", tmp_path), 32)
    msg = str(e.value)
    assert f"{tmp_path}/FashionMNIST/raw" in msg and "no-debian" in msg and "dataset-fashion-mnist" in msg


# --- transforms ----------------------------------------------------------------------------

def test_default_transform_names():
    cfg = BenchmarkConfig()
    assert resolve_transform_names(cfg, 32, 32) == ("crop_flip", "resize")
    assert resolve_transform_names(cfg, 224, 32) == ("rrc_flip", "resize")  # CIFAR at 224: CODA's test Resize
    assert resolve_transform_names(cfg, 224, 400) == ("rrc_flip", "resize_crop")


@pytest.mark.parametrize("norm,expected", [
    ("none", lambda v: [v, v, v]),
    ("half", lambda v: [(v - 0.5) / 0.5] * 3),
    ("cifar", lambda v: [(v - m) / s for m, s in zip((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))]),
])
def test_test_transforms_sizes_and_normalisation(norm, expected):
    img = torch.full((3, 48, 64), 100, dtype=torch.uint8)
    for kind in ("resize", "resize_crop", "resize_crop_bicubic"):
        out = build_transform(BenchmarkConfig(test_transform=kind, normalize=norm), 32, 400, train=False)(img)
        assert out.shape == (3, 32, 32)
        want = torch.tensor(expected(100 / 255), dtype=torch.float32)
        assert torch.allclose(out.mean((1, 2)), want, atol=1e-4)


def test_resize_crop_keeps_the_centre():
    """Resize(int(S*256/224)) + CenterCrop(S): a 72x72 image with a 2-pixel border of 255 at S=32
    is resized to 36 (border 1 px) and cropped to 32 (2 px off each side) -- the border is gone."""
    img = torch.zeros((3, 72, 72), dtype=torch.uint8)
    img[:, :2], img[:, -2:], img[:, :, :2], img[:, :, -2:] = 255, 255, 255, 255
    out = build_transform(BenchmarkConfig(test_transform="resize_crop"), 32, 400, train=False)(img)
    assert out.shape == (3, 32, 32) and out.max() < 0.05


@pytest.mark.parametrize("kind", ["none", "crop_flip", "rrc_flip", "hide_cifar"])
def test_train_transforms_give_the_input_size(kind):
    img = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    out = build_transform(BenchmarkConfig(train_transform=kind), 32, 28, train=True)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_unknown_transform_and_split_are_config_errors(cifar_root):
    with pytest.raises(ConfigError, match="unknown train_transform 'blur'"):
        build_transform(BenchmarkConfig(train_transform="blur"), 32, 32, train=True)
    with pytest.raises(ConfigError, match="applies to imagenet_r only"):
        load_dataset(_cfg("cifar100", cifar_root, split="random"), 32)


# --- the CLI: missing data -> exit 2, one sentence, no run directory ------------------------

@pytest.mark.parametrize("bench_name,needle", [("cub200", "CUB_200_2011.tgz"), ("imagenet_r", "imagenet-r.tar"),
                                               ("cifar100", "cifar-100-python.tar.gz"),
                                               ("fashion_mnist", "apt-get install dataset-fashion-mnist")])
def test_cli_missing_data_exits_2_without_a_run_dir(tmp_path, capsys, monkeypatch, bench_name, needle):
    import bench

    import benchmarks.data.datasets as D

    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")  # no download attempt: the message must say where to get it
    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian-copy")
    out = tmp_path / "runs"
    code = bench.main(["run", "-b", bench_name, "-m", "linear_probe", "--data-root", str(tmp_path / "nothing"),
                       "--out", str(out), "--device", "cpu", "--quiet", "--set", "backbone.pretrained=none"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()

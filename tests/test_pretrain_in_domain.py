"""In-domain pretraining: the held-out pool is exactly disjoint from the CL stream, the cached
backbone is keyed by its recipe, and the real pretraining writes a loadable, described file.

The data are a hand-made Fashion-MNIST in idx format whose every image carries its own identity
in three pixels (split, index // 256, index % 256), so the tests compare *images*, not indices
produced by the code under test.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.config import BackboneConfig, BenchmarkConfig, ConfigError

PER_CLASS_TRAIN, PER_CLASS_TEST = 30, 6


def _write_idx(path: Path, arr: np.ndarray) -> None:
    magic = 0x0800 + arr.ndim
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes())


def _fake_fashion(root: Path) -> Path:
    """10 classes; train image i of class i % 10 has pixels (0, 0..2) = (1, i // 256, i % 256)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, per, tag in (("train", PER_CLASS_TRAIN, 1), ("t10k", PER_CLASS_TEST, 2)):
        n = 10 * per
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        x[:, 0, 0], x[:, 0, 1], x[:, 0, 2] = tag, np.arange(n) // 256, np.arange(n) % 256
        y = np.arange(n) % 10
        _write_idx(root / f"{split}-images-idx3-ubyte", x)
        _write_idx(root / f"{split}-labels-idx1-ubyte", y)
    return root


def _ident(img: torch.Tensor) -> tuple:
    """(split tag, index) from a uint8 (C, H, W) image or a float one in [0, 1] at native size."""
    px = img[0, 0, :3]
    px = (px * 255).round().long() if img.is_floating_point() else px.long()
    return int(px[0]), int(px[1]) * 256 + int(px[2])


@pytest.fixture
def fashion(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")
    monkeypatch.setenv("PROMPTCL_CACHE", str(tmp_path / "cache"))
    root = _fake_fashion(tmp_path / "fm")
    return BenchmarkConfig(name="fashion_mnist", data_root=str(root), num_tasks=5, train_per_class=12, test_per_class=4,
                           pretrain_holdout=10, train_transform="none")


def test_pool_is_exactly_disjoint_from_every_task_image(fashion):
    from benchmarks.data.scenarios import build_scenario
    from methods.pretrain import in_domain_pool

    images, ident = in_domain_pool(fashion, image_size=28)  # native size: the transform only scales to [0,1]
    x, y = images()
    pool = {_ident(img) for img in x}
    assert len(pool) == len(x) == 10 * 10 == ident["images"]
    assert all(tag == 1 for tag, _ in pool)  # training images only
    assert sorted(np.bincount(y.numpy()).tolist()) == [10] * 10
    assert all(i % 10 == int(lbl) for (_, i), lbl in zip((_ident(img) for img in x), y))  # labels are the images' own

    seen = set()
    for seed in (0, 1):
        sc = build_scenario(fashion, seed, 28)
        for ds in sc.train_sets:
            seen |= {_ident(ds.split.load(int(i))) for i in ds.indices}
        test = {_ident(ds.split.load(int(i))) for ds in sc.test_sets for i in ds.indices}
        assert all(tag == 2 for tag, _ in test)
    assert len(seen) == 10 * 12 and all(tag == 1 for tag, _ in seen)
    assert pool.isdisjoint(seen)
    # 30 per class = 10 held out + 20 left, of which the stream takes 12: nothing else is lost
    assert len(pool | seen) == 10 * (10 + 12)


def test_holdout_changes_only_the_training_stream(fashion):
    from benchmarks.data.datasets import load_dataset

    with_h = load_dataset(fashion, 28)
    without = load_dataset(dataclasses.replace(fashion, pretrain_holdout=0), 28)
    assert torch.equal(with_h[1].images, without[1].images)  # the test split is untouched
    assert with_h[2].extra["pretrain_holdout_images"] == 100 and "pretrain_holdout_images" not in without[2].extra
    with pytest.raises(ConfigError, match="without training images"):
        load_dataset(dataclasses.replace(fashion, pretrain_holdout=PER_CLASS_TRAIN), 28)


def test_in_domain_needs_a_real_benchmark_and_a_holdout(fashion):
    from methods.pretrain import in_domain_pool

    with pytest.raises(ConfigError, match="synthetic"):
        in_domain_pool(BenchmarkConfig(name="synthetic", pretrain_holdout=5), 32)
    with pytest.raises(ConfigError, match="pretrain_holdout > 0"):
        in_domain_pool(dataclasses.replace(fashion, pretrain_holdout=0), 32)


def test_cache_is_keyed_by_the_recipe(fashion, monkeypatch, tmp_path):
    import methods.pretrain as P
    from methods.backbones import build_model, create_backbone

    calls = []

    def fake(arch, images, rec, out_path, log=print):
        from safetensors.torch import save_file

        calls.append((out_path, rec))
        torch.manual_seed(len(calls))
        save_file({k: v.contiguous() for k, v in build_model(arch).state_dict().items()}, str(out_path))
        return rec

    monkeypatch.setattr(P, "pretrain_in_domain", fake)
    arch = "vit_micro_patch8_32"
    first = P.pretrained_in_domain_path(arch, fashion, log=lambda m: None)
    assert P.pretrained_in_domain_path(arch, fashion, log=lambda m: None) == first and len(calls) == 1
    assert first.parent == tmp_path / "cache" and first.name.startswith(f"{arch}-indomain-fashion_mnist-")
    # every ingredient of the recipe gives another file: the pool, its seed, the training settings
    other_pool = P.pretrained_in_domain_path(arch, dataclasses.replace(fashion, pretrain_holdout=8), log=lambda m: None)
    other_seed = P.pretrained_in_domain_path(arch, dataclasses.replace(fashion, split_seed=7), log=lambda m: None)
    monkeypatch.setattr(P, "IN_DOMAIN_EPOCHS", P.IN_DOMAIN_EPOCHS + 1)
    other_epochs = P.pretrained_in_domain_path(arch, fashion, log=lambda m: None)
    assert len({first, other_pool, other_seed, other_epochs}) == 4 and len(calls) == 4
    assert calls[1][1]["images"] == 80 and calls[2][1]["split_seed"] == 7 and calls[3][1]["epochs"] == calls[0][1]["epochs"] + 1
    # the CL stream's subsample size is not part of the recipe: the same pool, the same backbone
    monkeypatch.setattr(P, "IN_DOMAIN_EPOCHS", P.IN_DOMAIN_EPOCHS - 1)
    assert P.pretrained_in_domain_path(arch, dataclasses.replace(fashion, train_per_class=5), log=lambda m: None) == first
    # the run's backbone is that file, and says so
    _, info = create_backbone(BackboneConfig(name=arch, pretrained="synthetic", pretrain="in_domain"), benchmark=fashion)
    import hashlib

    assert info.checkpoint == str(first) and info.sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    assert info.tag == "in_domain_pretrain:fashion_mnist" and len(calls) == 4
    with pytest.raises(ConfigError, match="procedural or in_domain"):
        create_backbone(BackboneConfig(name=arch, pretrained="synthetic", pretrain="imagenet"), benchmark=fashion)


def test_real_pretraining_writes_weights_and_their_description(fashion, monkeypatch, one_thread):
    import methods.pretrain as P
    from methods.backbones import build_model
    from methods.checkpoints import load_checkpoint_into

    monkeypatch.setattr(P, "IN_DOMAIN_EPOCHS", 1)
    lines = []
    path = P.pretrained_in_domain_path("vit_micro_patch8_32", fashion, log=lines.append)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["images"] == 100 and meta["epochs"] == 1 and meta["val_images"] == 10  # 5 % of 10 per class, min 1
    assert 0 <= meta["val_acc"] <= 100 and meta["cpu_seconds"] > 0
    import hashlib

    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert lines[0].startswith("pretraining the vit_micro_patch8_32 backbone in-domain on 100 held-out")
    assert any("epoch 1/1 loss" in ln for ln in lines)
    model = build_model("vit_micro_patch8_32")
    load_checkpoint_into(model, path, "timm")  # strict: every key of the micro ViT, nothing else


def test_synthetic_benchmark_refuses_a_holdout():
    from benchmarks.data.scenarios import build_scenario

    with pytest.raises(ConfigError, match="pretrain_holdout is not available for synthetic"):
        build_scenario(BenchmarkConfig(name="synthetic", num_classes=4, num_tasks=2, train_per_class=2,
                                       test_per_class=2, pretrain_holdout=3), 0, 32)

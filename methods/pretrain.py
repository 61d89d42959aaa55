"""A pretrained backbone at CPU scale: the micro ViT pretrained by the suite, two ways.

* ``backbone.pretrain: procedural`` (below): on procedural classes disjoint from every task;
* ``backbone.pretrain: in_domain`` (:func:`pretrained_in_domain_path`): supervised on the
  benchmark's ``benchmark.pretrain_holdout`` training images per class, which
  ``benchmarks/data/datasets.py:finish_splits`` removes from the CL stream (images disjoint from the
  tasks, classes shared: the papers' ImageNet-21k relation; docs/data.md §6).

Prompt methods only make sense on a pretrained, frozen backbone, and no hub is reachable from a
CPU test machine. So the suite pretrains its micro ViT itself, supervised, on two families of
procedural classes that no CL benchmark uses:

* ``TEXTURE_CLASSES`` colour-texture classes of the ``pretrain`` namespace of
  ``benchmarks/data/synthetic.py`` (gratings, a coloured shape, a distractor blob); the synthetic CL
  benchmark draws from the ``cl`` namespace, so pretraining never sees one of its classes;
* ``SHAPE_CLASSES`` silhouette and stroke classes defined here (:func:`render_shape_class`):
  filled outlines made of a radial-harmonic body with attached or cut-out parts, and figures of
  2-4 thick Bezier strokes, light on dark (sometimes inverted or tinted), with an optional stripe
  texture. They give the features the edge and outline detectors that small grayscale object
  images need (version 1, textures only, transferred poorly to Fashion-MNIST: a linear probe
  scored as low as fine-tuning). No real image, and no Fashion-MNIST class, is involved.

What it is: a seeded, deterministic (on one machine) stand-in for "ImageNet-pretrained", good
enough that frozen features separate unseen procedural classes and real small images
(Fashion-MNIST). What it is not: a model of any real pretraining; accuracies on it say nothing
about ViT-B/16 numbers, only about the relative behaviour of methods and about the code's
correctness.

The weights are cached as ``<cache>/<arch>-synthetic-v<VERSION>-<recipe hash>.safetensors`` (cache:
``$PROMPTCL_CACHE`` or ``~/.cache/promptcl-bench``) with a JSON file of its settings, accuracy
and SHA-256; results record that SHA-256. About two minutes on an idle 2-core CPU, once.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Bump VERSION whenever the data generators change (benchmarks/data/synthetic.py's 'pretrain'
# namespace or render_shape_class); the settings below are hashed into the cache name anyway.
# v1: 100 texture classes x 100, 6 epochs. v2: + 100 shape classes, 60 per class, 8 epochs.
VERSION = 2
TEXTURE_CLASSES = 100
SHAPE_CLASSES = 100
PRETRAIN_CLASSES = TEXTURE_CLASSES + SHAPE_CLASSES
PER_CLASS = 60
EPOCHS = 8  # 6 epochs gave a linear probe on Fashion-MNIST 54.9 -> 39.1 % (docs/data.md)
BATCH = 128
LR = 2e-3
WEIGHT_DECAY = 0.05
GRAY_P = 0.2  # share of each batch turned grayscale (colour-invariant features)
SEED = 0


def recipe() -> dict:
    """Every setting that determines the pretrained weights (hashed into the cache file name)."""
    return {"version": VERSION, "texture_classes": TEXTURE_CLASSES, "shape_classes": SHAPE_CLASSES,
            "per_class": PER_CLASS, "epochs": EPOCHS, "batch": BATCH, "lr": LR,
            "weight_decay": WEIGHT_DECAY, "gray_p": GRAY_P, "seed": SEED}


def recipe_hash() -> str:
    """First 10 hex digits of the SHA-256 of :func:`recipe` (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    return Path(os.environ.get("PROMPTCL_CACHE", Path.home() / ".cache" / "promptcl-bench"))


# --- silhouette and stroke classes ---------------------------------------------------------

def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def shape_recipe(class_id: int) -> dict:
    """The fixed random recipe of shape class ``class_id`` (even: silhouette, odd: strokes)."""
    r = np.random.default_rng(_seed("shape-recipe", class_id))
    rec = {
        "kind": "stroke" if class_id % 2 else "silhouette",
        "fg": r.uniform(0.45, 1.0),
        "bg": r.uniform(0.0, 0.15),
        "tint": r.uniform(0.6, 1.0, 3) if r.random() < 0.5 else np.ones(3),
        "invert": bool(r.random() < 0.2),
        "stripe_f": r.uniform(2, 8),
        "stripe_th": r.uniform(0, np.pi),
        "stripe_a": r.uniform(0, 0.35) * float(r.random() < 0.5),
        "center": r.uniform(0.42, 0.58, 2),
    }
    if rec["kind"] == "silhouette":
        n_parts = int(r.integers(0, 4))
        rec.update(
            R=r.uniform(0.28, 0.42),
            aspect=r.uniform(0.5, 1.6),
            harm=r.uniform(-0.22, 0.22, 5) / np.arange(1, 6) ** 0.7,
            phase=r.uniform(0, 2 * np.pi, 5),
            # (offset, half extents, 0 box / 1 ellipse added, 2 ellipse cut out)
            parts=[(r.uniform(-0.3, 0.3, 2), r.uniform(0.06, 0.25, 2), int(r.integers(0, 3))) for _ in range(n_parts)],
        )
    else:
        rec.update(strokes=r.uniform(0.1, 0.9, (int(r.integers(2, 5)), 3, 2)), thick=r.uniform(0.04, 0.09))
    return rec


def render_shape_class(class_id: int, n: int, size: int, sample_seed: int) -> np.ndarray:
    """``n`` samples (n, 3, size, size) uint8 of shape class ``class_id``.

    Each sample re-draws scale (+-15%), rotation, position, the outline's phases or the strokes'
    control points, brightness and pixel noise; edges are soft (sub-pixel) so that the class is
    in the outline, not in aliasing patterns.
    """
    rc = shape_recipe(class_id)
    r = np.random.default_rng(_seed("shape-samples", class_id, sample_seed))
    grid = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    s = r.uniform(0.85, 1.15, (n, 1, 1))
    rot = r.normal(0, 0.12, (n, 1, 1))
    cx = rc["center"][0] + r.normal(0, 0.04, (n, 1, 1))
    cy = rc["center"][1] + r.normal(0, 0.04, (n, 1, 1))
    u0, v0 = (xx - cx) / s, (yy - cy) / s
    u, v = u0 * np.cos(rot) + v0 * np.sin(rot), -u0 * np.sin(rot) + v0 * np.cos(rot)
    soft = 0.6 / size
    if rc["kind"] == "silhouette":
        ua, va = u / np.sqrt(rc["aspect"]), v * np.sqrt(rc["aspect"])
        rho, th = np.sqrt(ua**2 + va**2), np.arctan2(va, ua)
        radius = rc["R"] * (1 + sum(rc["harm"][k] * np.cos((k + 1) * th + rc["phase"][k] + r.normal(0, 0.1, (n, 1, 1)))
                                    for k in range(5)))
        sd = radius - rho  # signed distance-like: > 0 inside
        for off, ext, kind in rc["parts"]:
            du, dv = np.abs(u - off[0]) / ext[0], np.abs(v - off[1]) / ext[1]
            d = (1 - np.maximum(du, dv)) if kind == 0 else (1 - np.sqrt(du**2 + dv**2))
            d = d * ext.min()
            sd = np.maximum(sd, d) if kind < 2 else np.minimum(sd, -d)
        mask = 1 / (1 + np.exp(-sd / soft))
    else:
        t = np.linspace(0, 1, 20)[:, None]
        dmin = np.full((n, size, size), np.inf)
        for p in rc["strokes"]:
            pts = p[None] + r.normal(0, 0.025, (n, 3, 2))  # quadratic Bezier control points
            curve = ((1 - t) ** 2)[None] * pts[:, None, 0] + (2 * t * (1 - t))[None] * pts[:, None, 1] + (t**2)[None] * pts[:, None, 2]
            cu, cv = curve[..., 0] - 0.5, curve[..., 1] - 0.5
            d = np.sqrt((u[:, None] - cu[:, :, None, None]) ** 2 + (v[:, None] - cv[:, :, None, None]) ** 2).min(1)
            dmin = np.minimum(dmin, d)
        thick = rc["thick"] * r.uniform(0.8, 1.2, (n, 1, 1))
        mask = 1 / (1 + np.exp(-(thick - dmin) / soft))
    stripes = 1 + rc["stripe_a"] * np.sin(2 * np.pi * rc["stripe_f"] * (u * np.cos(rc["stripe_th"]) + v * np.sin(rc["stripe_th"])))
    fg = rc["fg"] * r.uniform(0.85, 1.15, (n, 1, 1)) * stripes
    bg = rc["bg"] + r.uniform(-0.03, 0.03, (n, 1, 1))
    gray = bg + (fg - bg) * mask
    if rc["invert"]:
        gray = 1 - gray
    img = gray[:, None] * rc["tint"][None, :, None, None]
    img = img + r.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_pretrain_data(per_class: int, size: int, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Texture classes (labels 0..TEXTURE_CLASSES-1), then shape classes, as uint8 images."""
    from benchmarks.data.synthetic import make_synthetic

    xs, ys = make_synthetic(range(TEXTURE_CLASSES), per_class, size, "pretrain", split)
    shapes = [render_shape_class(c, per_class, size, _seed(split)) for c in range(SHAPE_CLASSES)]
    xs = torch.cat([xs, torch.from_numpy(np.concatenate(shapes))]) if shapes else xs
    ys = torch.cat([ys, torch.arange(TEXTURE_CLASSES, PRETRAIN_CLASSES).repeat_interleave(per_class)])
    return xs, ys


# --- training ------------------------------------------------------------------------------

def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Batch-wise random crop (pad 4), horizontal flip and grayscale on a float batch."""
    b, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (b,), generator=g)
    dy = torch.randint(0, 9, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None]).clamp(max=h + 7)
    cols = (dx[:, None] + torch.arange(w)[None]).clamp(max=w + 7)
    out = pad[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    gray = torch.rand(b, generator=g) < GRAY_P
    out[gray] = out[gray].mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return out


def _train_supervised(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int,
                      log, name: str, seed: int = SEED) -> nn.Linear:
    """AdamW + one-cycle, label smoothing 0.1, :func:`_augment` batches (float x in [0,1]);
    returns the classification head (used for the validation accuracy, never saved)."""
    head = nn.Linear(model.embed_dim, num_classes)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(x) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            logits = head(model(_augment(x[idx], g)))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"pretrain {name}: epoch {epoch + 1}/{epochs} loss {loss.item():.4g} ({time.time() - t0:.0f}s)")
    model.eval()
    return head


def _save(model: nn.Module, out_path: Path, meta: dict) -> dict:
    """Write the weights and ``<name>.json`` (meta + SHA-256) atomically; returns the meta."""
    from safetensors.torch import save_file

    from methods.checkpoints import sha256_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(f".{os.getpid()}.tmp")  # unique: two processes may race here
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, out_path)
    meta = {**meta, "sha256": sha256_file(out_path), "torch": torch.__version__}
    tmpj = out_path.with_suffix(f".{os.getpid()}.json.tmp")
    tmpj.write_text(json.dumps(meta, indent=1))
    os.replace(tmpj, out_path.with_suffix(".json"))
    return meta


def pretrain_micro(arch: str, out_path: Path, log=print) -> dict:
    """Pretrain ``arch`` (a micro config) on the procedural classes and save it to ``out_path``."""
    from methods.micro_vit import build_micro as build_model

    t0 = time.time()
    torch.manual_seed(SEED)
    model = build_model(arch)
    size = model.patch_embed.img_size[0]
    x, y = make_pretrain_data(PER_CLASS, size, "train")
    xv, yv = make_pretrain_data(10, size, "val")
    x, xv = x.float() / 255, xv.float() / 255
    head = _train_supervised(model, x, y, PRETRAIN_CLASSES, EPOCHS, log, arch)
    with torch.no_grad():
        pred = head(model(xv)).argmax(1)
    acc = (pred == yv).float().mean().item() * 100
    acc_shapes = (pred == yv)[yv >= TEXTURE_CLASSES].float().mean().item() * 100 if SHAPE_CLASSES else None
    return _save(model, out_path, {"arch": arch, **recipe(), "recipe_hash": recipe_hash(), "val_acc": acc,
                                   "val_acc_shapes": acc_shapes, "seconds": time.time() - t0})


# --- in-domain pretraining ---------------------------------------------------------------
# The papers' setting at CPU scale: the backbone is pretrained, supervised, on images of the CL
# data set's domain that the CL stream never sees (ImageNet-21k for CIFAR-100 / ImageNet-R: other
# images, overlapping classes). Here: the benchmark.pretrain_holdout images per class that
# benchmarks/data/datasets.py:finish_splits removes from the training split before the CL subsample.
IN_DOMAIN_VERSION = 1
IN_DOMAIN_EPOCHS = 6
IN_DOMAIN_VAL = 0.05  # share of the pool (per class, seeded) kept for the reported val accuracy


def in_domain_pool(bcfg, image_size: int) -> Tuple[Callable[[], Tuple[torch.Tensor, torch.Tensor]], dict]:
    """The held-out pool of ``bcfg``: (a function giving (float images, labels), its identity).

    Exactly the positions :func:`benchmarks.data.datasets.pretrain_holdout_indices` returns on the full
    training split, i.e. the ones :func:`benchmarks.data.datasets.finish_splits` excludes from the CL
    stream, after the scenario's test transform (resize to the input size, [0,1], ``normalize``).
    Labels are the data set's own class ids (0..C-1). The images are only decoded when the
    function is called (a cached backbone needs only the identity).
    """
    import dataclasses

    from benchmarks.config import ConfigError
    from benchmarks.data.datasets import build_transform, list_sha256, load_dataset, pretrain_holdout_indices

    if bcfg.name == "synthetic":
        raise ConfigError("backbone.pretrain=in_domain needs a real data set (the synthetic benchmark has no held-out "
                          "training images); use backbone.pretrain=procedural")
    if bcfg.pretrain_holdout <= 0:
        raise ConfigError("backbone.pretrain=in_domain needs benchmark.pretrain_holdout > 0 (training images per class "
                          "held out of the CL stream for pretraining)")
    size = bcfg.image_size or image_size
    full_cfg = dataclasses.replace(bcfg, train_per_class=None, test_per_class=1, pretrain_holdout=0)
    train, _, info = load_dataset(full_cfg, size)
    held = pretrain_holdout_indices(train.targets, bcfg.pretrain_holdout, bcfg.split_seed)
    tf = build_transform(full_cfg, size, info.native_size, train=False)

    def images() -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([tf(torch.stack([train.load(int(i)) for i in held[j : j + 2048]])) for j in range(0, len(held), 2048)])
        return x, torch.as_tensor(train.targets[held], dtype=torch.long)

    ident = {"benchmark": bcfg.name, "holdout_per_class": bcfg.pretrain_holdout, "split_seed": bcfg.split_seed,
             "images": int(len(held)), "image_size": size, "normalize": bcfg.normalize,
             "test_transform": bcfg.test_transform, "num_classes": info.num_classes,
             "pool_list_sha256": list_sha256((f"train/{i}", train.targets[i]) for i in held),
             "content_sha256": info.extra.get("content_sha256")}
    return images, ident


def in_domain_recipe(arch: str, ident: dict) -> dict:
    """Every setting that determines the in-domain weights, the pool's identity included."""
    return {"kind": "in_domain", "version": IN_DOMAIN_VERSION, "arch": arch, **ident, "epochs": IN_DOMAIN_EPOCHS,
            "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY, "gray_p": GRAY_P, "val_fraction": IN_DOMAIN_VAL,
            "seed": SEED}


def _hash(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:10]


def pretrain_in_domain(arch: str, images: Callable[[], Tuple[torch.Tensor, torch.Tensor]], rec: dict, out_path: Path,
                       log=print) -> dict:
    """Supervised pretraining of ``arch`` on the pool ``images()`` (single-threaded); saves to ``out_path``."""
    t0, c0 = time.time(), time.process_time()
    threads = torch.get_num_threads()
    # One thread: the micro ViT's ops are too small for intra-op threads to pay off, two threads
    # on a busy 2-core machine stalled (spin-waiting), and one thread makes the weights the same
    # wherever the suite runs on this CPU type (the cached file's SHA-256 is documented).
    torch.set_num_threads(1)
    try:
        return _pretrain_in_domain(arch, images, rec, out_path, log, t0, c0)
    finally:
        torch.set_num_threads(threads)


def _pretrain_in_domain(arch: str, images, rec: dict, out_path: Path, log, t0: float, c0: float) -> dict:
    from methods.micro_vit import build_micro as build_model

    x, y = images()
    g = np.random.default_rng(SEED)
    val = np.zeros(len(y), dtype=bool)
    for c in torch.unique(y).tolist():  # per-class seeded validation share
        idx = np.flatnonzero(y.numpy() == c)
        val[g.choice(idx, max(1, int(round(len(idx) * rec["val_fraction"]))), replace=False)] = True
    vt = torch.from_numpy(val)
    torch.manual_seed(SEED)
    model = build_model(arch)
    head = _train_supervised(model, x[~vt], y[~vt], int(rec["num_classes"]), rec["epochs"], log, f"{arch} in-domain")
    with torch.no_grad():
        pred = torch.cat([head(model(x[vt][i : i + 512])).argmax(1) for i in range(0, int(vt.sum()), 512)])
    acc = (pred == y[vt]).float().mean().item() * 100
    return _save(model, out_path, {**rec, "recipe_hash": _hash(rec), "val_acc": acc, "val_images": int(vt.sum()),
                                   "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0,
                                   "torch_threads": 1})


def pretrained_in_domain_path(arch: str, bcfg, log=None) -> Path:
    """Path of the cached in-domain micro ViT for benchmark config ``bcfg`` (pretrained when missing).

    Cached as ``<cache>/<arch>-indomain-<benchmark>-<recipe hash>.safetensors``; the recipe
    covers the pool (its positions, labels and the data set's content hash) and every training
    setting, so another holdout, split seed, image size or data file never reuses stale weights.
    """
    from methods.micro_vit import MICRO_CONFIGS

    images, ident = in_domain_pool(bcfg, MICRO_CONFIGS[arch]["img_size"])
    rec = in_domain_recipe(arch, ident)
    path = cache_dir() / f"{arch}-indomain-{bcfg.name}-{_hash(rec)}.safetensors"
    return _cached(path, lambda say: pretrain_in_domain(arch, images, rec, path, log=say), log,
                   f"pretraining the {arch} backbone in-domain on {ident['images']} held-out {bcfg.name} training images "
                   f"(once, about 2 CPU minutes, single-threaded; cached at {path})")


def _cached(path: Path, build, log, announce: str) -> Path:
    """``path`` when it exists, else ``build(log)`` under a lock file (concurrent callers wait
    for the first one and then read its result instead of pretraining again)."""
    import fcntl
    import sys

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            say = log or (lambda m: print(m, file=sys.stderr, flush=True))
            say(announce)
            build(say)
    return path


def pretrained_micro_path(arch: str, log=None) -> Path:
    """Path of the cached procedurally pretrained micro ViT, pretraining it first when missing.

    The file name carries the version and the recipe hash, so a changed setting never reuses
    stale weights (locking: :func:`_cached`).
    """
    path = cache_dir() / f"{arch}-synthetic-v{VERSION}-{recipe_hash()}.safetensors"
    return _cached(path, lambda say: pretrain_micro(arch, path, log=say), log,
                   f"pretraining the {arch} backbone on procedural classes (once, about 2 minutes on 2 cores; cached at {path})")

"""Procedurally generated image classes: deterministic from a seed, any number, no download.

Each class is a random recipe -- a background colour, two oriented colour gratings and a coloured
shape (disk, square or ring) at a position -- and each sample re-draws the grating phases, moves
the shape a few pixels, jitters the colours and adds pixel noise. Classes therefore differ in
texture frequency / orientation, colour and layout, the cues a small ViT can learn, and samples
of one class are visibly varied.

Class ``c`` of namespace ``ns`` always has the same recipe, whatever else is generated, so the
classes used to pretrain the tiny backbone (``namespace="pretrain"``) are disjoint from the
classes of the CL benchmark (``namespace="cl"``).
"""
from __future__ import annotations

import hashlib
from typing import Sequence, Tuple

import numpy as np
import torch


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def class_recipe(class_id: int, namespace: str) -> dict:
    """The fixed random recipe of one class."""
    r = np.random.default_rng(_seed("recipe", namespace, class_id))
    return {
        "bg": r.uniform(0.1, 0.9, 3),
        "freq": r.uniform(1.0, 5.0, 2),  # cycles per image
        "theta": r.uniform(0, np.pi, 2),
        "amp": r.uniform(0.15, 0.35, 2),
        "gcol": r.uniform(-1, 1, (2, 3)),
        "shape": int(r.integers(0, 3)),
        "pos": r.uniform(0.25, 0.75, 2),
        "radius": r.uniform(0.12, 0.25),
        "scol": r.uniform(0.0, 1.0, 3),
    }


def render_class(class_id: int, n: int, size: int, namespace: str, sample_seed: int) -> np.ndarray:
    """``n`` samples (n, 3, size, size) uint8 of one class."""
    rc = class_recipe(class_id, namespace)
    r = np.random.default_rng(_seed("samples", namespace, class_id, sample_seed))
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    img = np.broadcast_to(rc["bg"][None, :, None, None], (n, 3, size, size)).copy()
    img += r.normal(0, 0.12, (n, 3, 1, 1))  # colour jitter of the background
    for g in range(2):
        phase = r.uniform(0, 2 * np.pi, (n, 1, 1))
        freq = rc["freq"][g] * r.uniform(0.9, 1.1, (n, 1, 1))
        theta = rc["theta"][g] + r.normal(0, 0.08, (n, 1, 1))
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        amp = rc["amp"][g] * r.uniform(0.6, 1.4, (n, 1, 1, 1))
        img += amp * wave[:, None] * rc["gcol"][g][None, :, None, None]
    cx = rc["pos"][0] + r.normal(0, 0.08, (n, 1, 1))
    cy = rc["pos"][1] + r.normal(0, 0.08, (n, 1, 1))
    rad = rc["radius"] * r.uniform(0.85, 1.15, (n, 1, 1))
    if rc["shape"] == 0:
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < rad**2
    elif rc["shape"] == 1:
        inside = (np.abs(xx - cx) < rad) & (np.abs(yy - cy) < rad)
    else:
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        inside = (d2 < rad**2) & (d2 > (0.55 * rad) ** 2)
    scol = rc["scol"][None, :, None, None] + r.normal(0, 0.12, (n, 3, 1, 1))
    img = np.where(inside[:, None], scol, img)
    # a distractor blob of random colour at a random place, shared by no class
    dx, dy = r.uniform(0, 1, (n, 1, 1)), r.uniform(0, 1, (n, 1, 1))
    blob = (xx - dx) ** 2 + (yy - dy) ** 2 < r.uniform(0.05, 0.12, (n, 1, 1)) ** 2
    img = np.where(blob[:, None], r.uniform(0, 1, (n, 3, 1, 1)), img)
    contrast = r.uniform(0.75, 1.25, (n, 1, 1, 1))
    img = (img - 0.5) * contrast + 0.5 + r.normal(0, 0.05, (n, 1, 1, 1))
    img += r.normal(0, 0.08, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_synthetic(
    class_ids: Sequence[int], per_class: int, size: int, namespace: str, split: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, size, size) uint8 and labels (N,) for ``class_ids`` (label = position)."""
    xs, ys = [], []
    for label, c in enumerate(class_ids):
        xs.append(render_class(c, per_class, size, namespace, _seed(split)))
        ys.append(np.full(per_class, label, dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

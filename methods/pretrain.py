"""A pretrained backbone at CPU scale: the micro ViT pretrained on disjoint procedural classes.

Prompt methods only make sense on a pretrained, frozen backbone, and no hub is reachable from a
CPU test machine. So the suite pretrains its micro ViT itself, supervised, on ``PRETRAIN_CLASSES``
procedural classes of the ``pretrain`` namespace of ``benchmarks/synthetic.py``. No CL benchmark
uses that namespace, so pretraining never sees a CL class.

What it is: a seeded, deterministic (on one machine) stand-in for "ImageNet-pretrained", good
enough that frozen features separate unseen procedural classes and, less well, real small images
(Fashion-MNIST). What it is not: a model of any real pretraining; accuracies on it say nothing
about ViT-B/16 numbers, only about the relative behaviour of methods and about the code's
correctness.

The weights are cached as ``<cache>/<arch>-synthetic-v<VERSION>.safetensors`` (cache:
``$PROMPTCL_CACHE`` or ``~/.cache/promptcl-bench``) with a JSON file of its settings, accuracy
and SHA-256. About a minute on a 2-core CPU, once.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VERSION = 1
PRETRAIN_CLASSES = 100
PER_CLASS = 100
EPOCHS = 6
BATCH = 128
LR = 2e-3
WEIGHT_DECAY = 0.05
SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("PROMPTCL_CACHE", Path.home() / ".cache" / "promptcl-bench"))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Batch-wise random crop (pad 4) and horizontal flip on a float batch."""
    b, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (b,), generator=g)
    dy = torch.randint(0, 9, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None]).clamp(max=h + 7)
    cols = (dx[:, None] + torch.arange(w)[None]).clamp(max=w + 7)
    out = pad[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def pretrain_micro(arch: str, out_path: Path, log=print) -> dict:
    """Pretrain ``arch`` (a micro config) on procedural classes and save it to ``out_path``."""
    from methods.backbones import build_model
    from benchmarks.synthetic import make_synthetic

    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model = build_model(arch)
    size = model.patch_embed.img_size[0]
    x, y = make_synthetic(range(PRETRAIN_CLASSES), PER_CLASS, size, "pretrain", "train")
    xv, yv = make_synthetic(range(PRETRAIN_CLASSES), 10, size, "pretrain", "val")
    x, xv = x.float() / 255, xv.float() / 255
    head = nn.Linear(model.embed_dim, PRETRAIN_CLASSES)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * math.ceil(len(x) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            logits = head(model(_augment(x[idx], g)))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"pretrain {arch}: epoch {epoch + 1}/{EPOCHS} loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        acc = (head(model(xv)).argmax(1) == yv).float().mean().item() * 100
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out_path)
    meta = {
        "arch": arch,
        "version": VERSION,
        "classes": PRETRAIN_CLASSES,
        "per_class": PER_CLASS,
        "epochs": EPOCHS,
        "seed": SEED,
        "val_acc": acc,
        "seconds": time.time() - t0,
        "torch": torch.__version__,
    }
    from methods.backbones import sha256_file

    meta["sha256"] = sha256_file(out_path)
    tmpj = out_path.with_suffix(".json.tmp")
    tmpj.write_text(json.dumps(meta, indent=1))
    os.replace(tmpj, out_path.with_suffix(".json"))
    return meta


def pretrained_micro_path(arch: str, log=None) -> Path:
    """Path of the cached pretrained micro ViT, pretraining it first when missing."""
    path = cache_dir() / f"{arch}-synthetic-v{VERSION}.safetensors"
    if not path.exists():
        import sys

        say = log or (lambda m: print(m, file=sys.stderr))
        say(f"pretraining the {arch} backbone on procedural classes (once, about a minute; cached at {path})")
        pretrain_micro(arch, path, log=say)
    return path

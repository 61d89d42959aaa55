"""How well a frozen backbone's features suit a class-incremental benchmark, in seconds.

Usage::

    python -m benchmarks.tools.feature_probe -b fashion_mnist --data-root /usr/share/datasets/fashion-mnist \
        [--features backbone|pixels|indomain] [--checkpoint FILE] [--seeds 0 1 2] [--preset quick]
        [--set backbone.pretrain=procedural]

Before spending CPU hours on a full comparison with a new backbone (``--checkpoint``) or a new
benchmark, this answers: do the frozen features separate the classes, and does the
class-incremental head that the reference codes train survive on them? On the frozen query
features (the final [CLS], test transform for train and test images, no augmentation) of the
run's scenario (same preset, subsample and class order per seed) it reports

* ``ncm``: nearest class mean by cosine over all classes (what the ``ncm`` baseline does);
* ``masked_probe``: the final average accuracy of one linear head trained task by task with the
  softmax over the current task's classes only (``train_mask: current``, the head of L2P,
  DualPrompt, CODA-Prompt, HiDe before alignment, SMoPE and the ``linear_probe`` baseline), with
  the preset's optimiser settings (Adam, lr, epochs, batch size);
* ``joint_probe``: the same head trained on all tasks at once (a frozen-feature upper bound).

``masked_probe`` far below ``ncm`` means the per-task heads cannot be compared across tasks:
the softmax never constrains a class's logit on other tasks' images, and with few classes per
task (Fashion-MNIST: 2) an image of a later task can project strongly on an earlier task's
discriminant. Prompt methods with such a head then land near sequential fine-tuning whatever
their prompts do (docs/data.md §6). Two feature sources calibrate the scale:

* ``pixels``: the channel-mean pixels after the test transform, flattened (no backbone);
* ``indomain``: a 2-layer MLP (256 hidden, 64 out, LayerNorm like a ViT's final norm) trained
  supervised for a few epochs on the benchmark's own training images that the run's subsample
  does not use. It is *not* disjoint from the tasks (same classes): a ceiling for what
  class-specific features allow, never a backbone to report results with.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURES = ("backbone", "pixels", "indomain")
Split = Tuple[Tensor, Tensor]  # (features (N, D), labels (N,)) of one task


@dataclass
class ProbeSettings:
    """Optimiser settings of the two linear probes (taken from the preset's ``train`` section)."""

    epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0


def ncm_accuracy(train: Sequence[Split], test: Sequence[Split]) -> float:
    """Accuracy (%) over all test images of the nearest class mean by cosine similarity."""
    x = torch.cat([f for f, _ in train])
    y = torch.cat([l for _, l in train])
    classes = torch.unique(y)
    means = F.normalize(torch.stack([x[y == c].mean(0) for c in classes]), dim=-1)
    xt = torch.cat([f for f, _ in test])
    yt = torch.cat([l for _, l in test])
    pred = classes[(F.normalize(xt, dim=-1) @ means.T).argmax(1)]
    return (pred == yt).float().mean().item() * 100


def _fit(model: nn.Module, x: Tensor, y: Tensor, mask: Optional[Tensor], epochs: int, batch_size: int,
         opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    """Minibatch cross-entropy training of ``model`` (x -> logits); ``mask`` is added to the logits."""
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            logits = model(x[idx])
            loss = F.cross_entropy(logits if mask is None else logits + mask, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _train_head(head: nn.Linear, x: Tensor, y: Tensor, allowed: Optional[Tensor], s: ProbeSettings,
                opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    mask = None
    if allowed is not None:  # -inf on every logit outside the allowed classes
        mask = torch.full((head.out_features,), float("-inf"))
        mask[allowed] = 0.0
    _fit(head, x, y, mask, s.epochs, s.batch_size, opt, g)


def _fresh_head(dim: int, num_classes: int, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        return nn.Linear(dim, num_classes)


def _accuracy(head: nn.Linear, test: Sequence[Split]) -> float:
    xt = torch.cat([f for f, _ in test])
    yt = torch.cat([l for _, l in test])
    with torch.no_grad():
        return (head(xt).argmax(1) == yt).float().mean().item() * 100


def masked_probe_accuracy(train: Sequence[Split], test: Sequence[Split], num_classes: int,
                          s: ProbeSettings = ProbeSettings(), head: Optional[nn.Linear] = None) -> float:
    """Final accuracy (%) of a linear head trained task by task on the current task's logits.

    ``train[t]`` holds task t's features and labels; every task starts a fresh Adam optimiser,
    as the protocol does for every phase. ``head`` (default: a fresh ``nn.Linear`` seeded by
    ``s.seed``) is trained in place.
    """
    head = head or _fresh_head(train[0][0].shape[1], num_classes, s.seed)
    g = torch.Generator().manual_seed(s.seed)
    for x, y in train:
        _train_head(head, x, y, torch.unique(y), s, torch.optim.Adam(head.parameters(), lr=s.lr), g)
    return _accuracy(head, test)


def joint_probe_accuracy(train: Sequence[Split], test: Sequence[Split], num_classes: int,
                         s: ProbeSettings = ProbeSettings()) -> float:
    """Accuracy (%) of the same head trained on all tasks' data at once, every logit in play."""
    head = _fresh_head(train[0][0].shape[1], num_classes, s.seed)
    opt = torch.optim.Adam(head.parameters(), lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)
    _train_head(head, torch.cat([f for f, _ in train]), torch.cat([l for _, l in train]), None, s, opt, g)
    return _accuracy(head, test)


# --- features of a scenario ----------------------------------------------------------------

def _images(ds) -> Tuple[Tensor, Tensor]:
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.as_tensor(ds.labels)


def _pixels(imgs: Tensor) -> Tensor:
    """Channel-mean pixels, flattened: (B, 3, S, S) -> (B, S*S)."""
    return imgs.mean(1).flatten(1)


def _indomain_extractor(cfg, scenario, limit: int = 20000, epochs: int = 5):
    """The non-disjoint ceiling: an MLP trained on the benchmark's training images the run skips."""
    import dataclasses

    from benchmarks.config import ConfigError
    from benchmarks.data.datasets import load_dataset, per_class_indices
    from benchmarks.data.scenarios import TaskDataset

    if cfg.benchmark.name == "synthetic":  # it renders only the images a run uses: no spare pool
        raise ConfigError("--features indomain needs a real data set with training images outside the run's subsample")
    full, _, _ = load_dataset(dataclasses.replace(cfg.benchmark, train_per_class=None, test_per_class=1), scenario.image_size)
    used = per_class_indices(full.targets, cfg.benchmark.train_per_class, cfg.benchmark.split_seed, "train")
    label_map = {c: i for i, c in enumerate(scenario.order)}
    free = np.setdiff1d(np.flatnonzero(np.isin(full.targets, scenario.order)), used)
    pool = np.sort(np.random.RandomState(cfg.seed).permutation(free)[:limit])
    if len(pool) == 0:
        raise ConfigError("the benchmark has no training image outside the run's subsample for --features indomain")
    x, y = _images(TaskDataset(full, pool, label_map, scenario.test_transform))
    x = _pixels(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 64), nn.LayerNorm(64))
        head = nn.Linear(64, scenario.num_classes)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    _fit(nn.Sequential(net, head), x, y, None, epochs, 128, opt, torch.Generator().manual_seed(cfg.seed))
    net.eval()
    return lambda imgs: net(_pixels(imgs))


def scenario_features(cfg, features: str = "backbone") -> Tuple[List[Split], List[Split], int]:
    """Per-task (features, labels) of the train (test transform) and test sets of ``cfg``'s run."""
    from benchmarks.data.scenarios import build_scenario
    from methods.backbones import create_backbone

    backbone, _ = create_backbone(cfg.backbone, benchmark=cfg.benchmark)
    backbone.eval()
    scenario = build_scenario(cfg.benchmark, cfg.seed, backbone.img_size)
    if features == "backbone":
        extract = backbone.query
    elif features == "pixels":
        extract = _pixels
    elif features == "indomain":
        extract = _indomain_extractor(cfg, scenario)
    else:
        from benchmarks.config import ConfigError

        raise ConfigError(f"unknown features '{features}'; choose one of {', '.join(FEATURES)}")

    def run(ds) -> Split:
        x, y = _images(ds)
        with torch.no_grad():
            return torch.cat([extract(x[i : i + 512]) for i in range(0, len(x), 512)]), y

    train = [run(ds.with_transform(scenario.test_transform)) for ds in scenario.train_sets]
    test = [run(ds) for ds in scenario.test_sets]
    return train, test, scenario.num_classes


def probe(cfg, features: str = "backbone") -> Dict[str, float]:
    """The three accuracies for one resolved run config (its seed, preset and benchmark)."""
    train, test, n = scenario_features(cfg, features)
    s = ProbeSettings(cfg.train.epochs, cfg.train.lr, cfg.train.batch_size, cfg.seed)
    return {"ncm": ncm_accuracy(train, test), "masked_probe": masked_probe_accuracy(train, test, n, s),
            "joint_probe": joint_probe_accuracy(train, test, n, s)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from benchmarks.run.cli import EXIT_USAGE, user_errors
    from benchmarks.config import deep_merge, parse_set, resolve_config

    ap = argparse.ArgumentParser(prog="python -m benchmarks.tools.feature_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("-b", "--benchmark", required=True)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--checkpoint", default=None, help="local backbone checkpoint (loaded strictly)")
    ap.add_argument("--features", default="backbone", choices=FEATURES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[],
                    help="config overrides, e.g. backbone.pretrain=procedural (the quick Fashion-MNIST default is in_domain)")
    args = ap.parse_args(argv)
    rows = {}
    try:
        for seed in args.seeds:
            ov: Dict[str, Dict] = {"seed": seed, "benchmark": {}}
            if args.data_root:
                ov["benchmark"]["data_root"] = args.data_root
            if args.checkpoint:
                ov["backbone"] = {"pretrained": "file", "checkpoint": args.checkpoint}
            cfg = resolve_config("linear_probe", args.benchmark, args.preset, deep_merge(ov, parse_set(args.set)))
            rows[seed] = probe(cfg, args.features)
    except user_errors() as e:
        print(f"error: {str(e).strip().rstrip('.')}.", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({str(k): v for k, v in rows.items()}))
        return 0
    from tabulate import tabulate

    keys = ("ncm", "masked_probe", "joint_probe")
    table = [[s] + [f"{r[k]:.1f}" for k in keys] for s, r in rows.items()]
    if len(rows) > 1:
        table.append(["mean"] + [f"{np.mean([r[k] for r in rows.values()]):.1f}" for k in keys])
    print(f"{args.benchmark}, preset {args.preset}, features {args.features}"
          + (f" ({args.checkpoint})" if args.checkpoint else "") + (f", {' '.join(args.set)}" if args.set else ""))
    print(tabulate(table, headers=["seed", *keys], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

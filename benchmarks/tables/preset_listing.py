"""``bench.py list presets --resolved``: what every method × preset × benchmark resolves to.

Per cell the effective tasks, epochs, batch size, drop_last, optimiser, lr (after the batch
scaling rule), schedule, train / test transforms with their interpolation, normalisation,
precision and class order, each with the preset layer it comes from (``<file>:<key>`` inside the
preset's section, e.g. ``smope.yaml:cifar100`` or ``_benchmarks.yaml:*``). A cell that would
leave one of these to a dataclass default does not resolve (``benchmarks/config.py``
``REQUIRED_KEYS``) and is listed with the reason. ``docs/presets.md`` is this listing
(:func:`render_markdown`); tests/test_preset_listing.py fails when the two drift.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.config import (DEFAULT_SOURCE, OVERRIDE_SOURCE, ConfigError, RunConfig, available_presets,
                               resolve_with_sources)

COLUMNS = ("tasks", "epochs", "batch", "drop_last", "optimizer", "lr", "schedule", "train transform",
           "test transform", "normalize", "precision", "class order")

_TRAIN_TF = {
    "rrc_flip": "RandomResizedCrop(scale {s:g}–1, bilinear) + flip",
    "rrc_flip_bicubic": "RandomResizedCrop(scale {s:g}–1, bicubic) + flip",
    "resize_crop_flip_bicubic": "Resize(S·300/224, bicubic) + RandomCrop(S) + flip",
    "hide_cifar": "RandomResizedCrop(scale 0.08–1, bicubic) + flip + ColorJitter(63/255)",
    "crop_flip": "Resize (bilinear) + RandomCrop(pad S/8) + flip",
    "none": "Resize (bilinear)",
    "default": "default: by image size",
}
_TEST_TF = {
    "resize": "Resize(S), bilinear",
    "resize_crop": "Resize(S·256/224) + CenterCrop(S), bilinear",
    "resize_bicubic": "Resize(S), bicubic",
    "resize_crop_bicubic": "Resize(S·256/224) + CenterCrop(S), bicubic",
    "default": "default: by image size",
}
_ORDERS = {
    "natural": "classes 0..C-1",
    "seeded": "random.Random(seed) shuffle",
    "coda": "natural for seed 0, else shuffled",
    "numpy": "np.random permutation",
}


@dataclass
class ResolvedCell:
    """One method × preset × benchmark: its values with their sources, or why it does not resolve."""

    method: str
    preset: str
    benchmark: str
    error: Optional[str] = None
    values: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # column -> (value, source)


def short_source(source: Optional[str], preset: str) -> str:
    """``l2p.yaml:paper:*`` -> ``l2p.yaml:*`` (the preset is the section's); None -> default."""
    if source is None:
        return DEFAULT_SOURCE
    if source == OVERRIDE_SOURCE:
        return "command line"
    return source.replace(f":{preset}:", ":", 1)


def _schedule(cfg: RunConfig) -> str:
    t = cfg.train
    if t.schedule == "coda_cosine":
        return "coda_cosine: per epoch, epochs 0-1 at the base lr"
    if t.schedule == "coswm":
        return f"coswm: {t.freeze_iters} iters at {t.min_lr:g}, cosine over {t.iter_step or 'real'}/epoch to {t.min_lr:g}"
    if t.schedule == "step":
        return f"step: ×{t.gamma:g} from epoch index {', '.join(map(str, t.milestones))}"
    if t.schedule == "cosine":
        return f"cosine per iteration to {t.min_lr:g}" + (f", {t.warmup_epochs} warm-up epochs" if t.warmup_epochs else "")
    return t.schedule


def cell_values(cfg: RunConfig, sources: Dict[str, str]) -> Dict[str, Tuple[str, str]]:
    """The listing's columns of one resolved config, each with its (shortened) source."""
    p = cfg.preset
    b, t = cfg.benchmark, cfg.train

    def src(*keys: str) -> str:
        seen: List[str] = []
        for k in keys:
            s = short_source(sources.get(k), p)
            if s not in seen and (k == keys[0] or k in sources):
                seen.append(s)
        return " + ".join(seen)

    lr = f"{t.lr:g}"
    if t.lr_scale_batch:
        lr += f" × {t.batch_size}/{t.lr_scale_batch} = {t.lr * t.batch_size / t.lr_scale_batch:.6g}"
    train_tf = f"{b.train_transform}: " + _TRAIN_TF.get(b.train_transform, b.train_transform).format(s=b.rrc_scale_min)
    out = {
        "tasks": (str(b.num_tasks), src("benchmark.num_tasks")),
        "epochs": (str(t.epochs), src("train.epochs")),
        "batch": (str(t.batch_size), src("train.batch_size")),
        "drop_last": (str(t.drop_last).lower(), src("train.drop_last")),
        "optimizer": (t.optimizer, src("train.optimizer")),
        "lr": (lr, src("train.lr", "train.lr_scale_batch")),
        "schedule": (_schedule(cfg), src("train.schedule")),
        "train transform": (train_tf, src("benchmark.train_transform", "benchmark.rrc_scale_min")),
        "test transform": (f"{b.test_transform}: {_TEST_TF.get(b.test_transform, b.test_transform)}",
                           src("benchmark.test_transform")),
        "normalize": (b.normalize, src("benchmark.normalize")),
        "precision": (cfg.precision, src("precision")),
        "class order": (f"{b.class_order} ({_ORDERS.get(b.class_order, '?')})", src("benchmark.class_order")),
    }
    if t.epochs <= 0:  # no training: the optimiser settings do not apply
        for k in ("drop_last", "optimizer", "lr", "schedule"):
            out[k] = ("—", "no training")
    return out


def resolved_cells(methods: Optional[Sequence[str]] = None, presets: Optional[Sequence[str]] = None,
                   benchmarks: Optional[Sequence[str]] = None) -> List[ResolvedCell]:
    """Every method × preset × benchmark (registered / available when not given), resolved strictly."""
    from benchmarks.data.datasets import list_datasets
    from methods.registry import list_methods

    cells: List[ResolvedCell] = []
    for m in methods or list_methods():
        for p in presets or available_presets():
            for bench in benchmarks or list_datasets():
                cell = ResolvedCell(m, p, bench)
                try:
                    cfg, sources = resolve_with_sources(m, bench, p)
                    cell.values = cell_values(cfg, sources)
                except ConfigError as e:
                    cell.error = str(e)
                cells.append(cell)
    return cells


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(cells: Sequence[ResolvedCell]) -> str:
    """Markdown: per preset, one row per resolved (method, benchmark), each value over its source."""
    lines: List[str] = []
    for p in dict.fromkeys(c.preset for c in cells):
        ok = [c for c in cells if c.preset == p and c.error is None]
        bad = [c for c in cells if c.preset == p and c.error is not None]
        lines += [f"## Preset `{p}`", ""]
        if ok:
            lines.append("| method | benchmark | " + " | ".join(COLUMNS) + " |")
            lines.append("|---|---|" + "---|" * len(COLUMNS))
            for c in ok:
                vals = [f"{_md_cell(v)}<br>`{_md_cell(s)}`" for v, s in (c.values[k] for k in COLUMNS)]
                lines.append(f"| {c.method} | {c.benchmark} | " + " | ".join(vals) + " |")
            lines.append("")
        if bad:
            lines.append(f"Not available with preset `{p}` (`bench.py run` stops with this sentence):")
            lines.append("")
            for c in bad:
                lines.append(f"* {c.method} on {c.benchmark}: {c.error}")
            lines.append("")
    return "\n".join(lines)


HEADER = """# Presets, resolved

Generated by `python bench.py list presets --resolved --markdown > docs/presets.md`; do not edit
by hand (tests/test_preset_listing.py fails when this file and the presets drift).

For every registered method, preset and benchmark: the values a run starts from, each over the
preset layer it comes from (`<file>:<key>` inside the preset's section of
`benchmarks/presets/<file>`; `*` applies to every benchmark; `@T` only with T tasks). A setting
that no layer sets would be a dataclass default: such a cell does not resolve, and is listed under
its preset with the error `bench.py run` gives. `--set` / command-line flags come on top.
`epochs` and `lr` are the main training phase's; methods with further phases (SMoPE's dense
warm-up, HiDe-Prompt's TII stage, alignment) configure them in their `method` section
(docs/methods-*.md). S is the backbone's input size. Interpolation: the train and test transform
names are those of `benchmarks/data/datasets.py` (docs/data.md §3).
"""


def render_markdown(cells: Optional[Sequence[ResolvedCell]] = None) -> str:
    """The full docs/presets.md text."""
    return HEADER + "\n" + render_table(cells if cells is not None else resolved_cells()) + "\n"

"""``bench.py cost``: the per-method cost table, its growth with the number of tasks, and a plot.

For each benchmark and method the method is built exactly as a run would build it (the preset's
method config, ``create_method`` with the scenario's class and task counts) on a randomly
initialised backbone -- no download, no data: parameter counts and MACs do not depend on weight
values -- and ``begin_task`` is called for every task. Figures come from :mod:`benchmarks.cost.engine`.

Outputs (``--out``): ``cost.csv`` (one row per benchmark × method), ``cost.md``, ``cost.tex``,
``growth.csv`` (the parameter figures for T = 5, 10, 20 tasks) and ``params_vs_tasks.png`` /
``.pdf``. The markdown table is printed. ``--throughput`` adds measured images/s and memory
(:mod:`benchmarks.run.throughput`) and an estimated wall-clock for a full preset run.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks.config import ConfigError, RunConfig, deep_merge, parse_set, preset_layers, resolve_config
from benchmarks.cost.flops import single_thread
from benchmarks.cost.engine import (
    POSTER_GFLOPS,
    QueryPass,
    flop_summary,
    parameter_counts,
    probe_input,
    query_pass,
    state_count,
    trainable_parameter_count,
)
from methods.backbones import split_name
from methods.base import ContinualMethod, Task

# Class counts and images per class (train, test) of the data sets, so that the table needs no
# data on disk. ImageNet-R: 30,000 images in 200 classes, 80/20 split; CUB-200-2011: 5,994 / 5,794.
DATASET_CLASSES = {"cifar100": 100, "imagenet_r": 200, "cub200": 200, "fashion_mnist": 10, "synthetic": 10}
DATASET_IMAGES_PER_CLASS = {
    "cifar100": (500, 100),
    "imagenet_r": (120, 30),
    "cub200": (5994 / 200, 5794 / 200),
    "fashion_mnist": (6000, 1000),
    "synthetic": (100, 50),
}
MICRO_THROUGHPUT_BACKBONE = "vit_micro_patch8_32"
GROWTH_TASKS = (5, 10, 20)

CSV_COLUMNS = [
    "method", "is_baseline", "benchmark", "backbone", "preset_used", "num_classes", "num_tasks",
    "backbone_params", "added_params", "trainable_params", "trainable_params_first", "trainable_params_last",
    "allocated_params", "used_params", "query_pass", "inference_passes", "train_passes",
    "inference_gmacs", "inference_gflops", "train_gmacs", "train_gflops", "train_fwd_gmacs", "train_bwd_gmacs",
    "attention_gmacs", "extra_gmacs", "paper_convention_gflops_inference", "paper_convention_gflops_train",
    "poster_gflops_train", "poster_gflops_test", "state_numbers", "state_bytes", "state_projected", "train_phase",
]
THROUGHPUT_COLUMNS = ["train_img_s", "infer_img_s", "peak_mem_mb", "batch_size", "precision", "hardware",
                      "throughput_backbone", "est_run_hours"]
GROWTH_COLUMNS = ["benchmark", "method", "num_tasks", "added_params", "allocated_params", "used_params",
                  "trainable_params", "state_numbers", "state_bytes"]


# --- configuration -------------------------------------------------------------------------

def split_names(values: Optional[Sequence[str]]) -> List[str]:
    """``-b a,b c`` -> ``[a, b, c]`` (the CLI's parsing, shared with ``bench.py run`` and sweeps)."""
    from benchmarks.run import cli as bench_cli
    return bench_cli.split_names(values)


def expand_methods(names: List[str]) -> List[str]:
    """``all`` / ``methods`` / ``baselines`` / names -> registered names (the CLI's expansion)."""
    from benchmarks.run import cli as bench_cli
    return bench_cli.expand_methods(names)


def resolve_method_config(method: str, benchmark: str, preset: str, overrides: Dict[str, Any]) -> Tuple[RunConfig, str]:
    """The run config of ``method``; when its preset file has no ``preset`` entry for the benchmark,
    the method section of its ``quick`` preset is used instead (and the label says so)."""
    own = f"{method}.yaml:"
    has_own = any(name.startswith(own) for name, _ in preset_layers(preset, benchmark, method))
    if has_own or preset == "quick":
        return resolve_config(method, benchmark, preset, overrides, strict=False), preset  # cost needs the architecture only
    borrowed: Dict[str, Any] = {}
    for name, layer in preset_layers("quick", benchmark, method):
        if name.startswith(own) and layer.get("method"):
            borrowed = deep_merge(borrowed, {"method": layer["method"]})
    label = f"quick method config (no {preset} preset)" if borrowed else f"method defaults (no {preset} preset)"
    return resolve_config(method, benchmark, preset, deep_merge(borrowed, overrides), strict=False), label


def benchmark_classes(cfg: RunConfig) -> int:
    b = cfg.benchmark
    if b.num_classes:
        return int(b.num_classes)
    if b.name in DATASET_CLASSES:
        return DATASET_CLASSES[b.name]
    raise ConfigError(f"the class count of benchmark '{b.name}' is not known to the cost report; pass --set benchmark.num_classes=N")


def make_tasks(num_classes: int, num_tasks: int) -> List[Task]:
    """Equal class splits, as ``benchmarks/data/scenarios.py`` makes them."""
    if num_tasks < 1 or num_classes % num_tasks:
        raise ConfigError(f"{num_classes} classes cannot be split evenly into {num_tasks} tasks")
    per = num_classes // num_tasks
    offsets = [t * per for t in range(num_tasks + 1)]
    return [Task(t, num_tasks, offsets[t], offsets[t + 1], offsets) for t in range(num_tasks)]


# --- backbones -----------------------------------------------------------------------------

def random_backbone(name: str, seed: int = 0) -> nn.Module:
    """The timm ViT ``name`` without a head, with seeded random weights, built without timm's slow
    weight initialisation (parameter counts and MACs do not depend on weight values): built on the
    meta device, materialised, then filled (normal(0, 0.02) weights, unit LayerNorm scales)."""
    from methods.backbones import build_model

    with torch.device("meta"):
        vit = build_model(name, pretrained=False)
    vit = vit.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in vit.modules():
            for pname, p in m.named_parameters(recurse=False):
                if isinstance(m, nn.LayerNorm) and pname == "weight":
                    p.fill_(1.0)
                elif pname == "bias" or isinstance(m, nn.LayerNorm):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            for bname, b in m.named_buffers(recurse=False):
                if b.is_floating_point():
                    b.zero_()
    return vit


class BackboneCache:
    """One random ViT per architecture, shared by every method (each gets its own PromptedViT,
    which re-freezes it), with its query pass counted once."""

    def __init__(self) -> None:
        self._vits: Dict[str, nn.Module] = {}
        self._queries: Dict[str, QueryPass] = {}

    def get(self, name: str) -> Tuple[Any, torch.Tensor, QueryPass]:
        from methods.vit import PromptedViT

        arch, _ = split_name(name)
        if arch not in self._vits:
            self._vits[arch] = random_backbone(name)
        backbone = PromptedViT(self._vits[arch])
        x = probe_input(backbone)
        if arch not in self._queries:
            self._queries[arch] = query_pass(backbone, x)
        return backbone, x, self._queries[arch]


def build_method(name: str, cfg: RunConfig, backbone: Any, num_classes: int, num_tasks: int, seed: int = 0) -> ContinualMethod:
    from methods.registry import create_method

    torch.manual_seed(seed)
    return create_method(name, backbone, num_classes, cfg.method, num_tasks=num_tasks)


# --- rows ----------------------------------------------------------------------------------

@dataclass
class MethodSetup:
    name: str
    benchmark: str
    cfg: RunConfig
    preset_used: str
    num_classes: int
    num_tasks: int
    backbone: str
    preset: str = "paper"
    overrides: Optional[Dict[str, Any]] = None

    def config_for(self, num_tasks: int) -> RunConfig:
        """The config for a run with ``num_tasks`` tasks (``benchmark@T`` preset entries apply)."""
        if num_tasks == self.num_tasks:
            return self.cfg
        over = deep_merge(self.overrides or {}, {"benchmark": {"num_tasks": num_tasks}})
        return resolve_method_config(self.name, self.benchmark, self.preset, over)[0]


def setups(benchmarks: List[str], methods: List[str], preset: str, overrides: Dict[str, Any]) -> List[MethodSetup]:
    """Resolve and validate every (benchmark, method) before anything is built or written."""
    from benchmarks.data.datasets import list_datasets

    out = []
    for b in benchmarks:
        if b not in list_datasets():
            raise ConfigError(f"unknown benchmark '{b}'; available benchmarks: {', '.join(list_datasets())}")
        for m in methods:
            cfg, label = resolve_method_config(m, b, preset, overrides)
            c = benchmark_classes(cfg)
            make_tasks(c, cfg.benchmark.num_tasks)
            out.append(MethodSetup(m, b, cfg, label, c, cfg.benchmark.num_tasks, cfg.backbone.name, preset, overrides))
    return out


def cost_row(s: MethodSetup, cache: BackboneCache) -> Tuple[Dict[str, Any], ContinualMethod, List[Task]]:
    """The cost.csv row of one (benchmark, method): counts in the first and the last task, MACs in
    the last task, state projected to the end of the run."""
    backbone, x, q = cache.get(s.backbone)
    method = build_method(s.name, s.cfg, backbone, s.num_classes, s.num_tasks)
    tasks = make_tasks(s.num_classes, s.num_tasks)
    method.begin_task(tasks[0])
    first = trainable_parameter_count(method)
    for t in tasks[1:]:
        method.begin_task(t)
    counts = parameter_counts(method)
    state = state_count(method, project_task=tasks[-1])
    flops = flop_summary(method, x, q, s.name)
    # the poster's numbers are for ViT-B/16 at 224 px only
    poster = POSTER_GFLOPS.get(s.name, (None, None)) if split_name(s.backbone)[0] == "vit_base_patch16_224" else (None, None)
    row: Dict[str, Any] = {
        "method": s.name, "is_baseline": bool(method.is_baseline), "benchmark": s.benchmark, "backbone": s.backbone,
        "preset_used": s.preset_used, "num_classes": s.num_classes, "num_tasks": s.num_tasks,
        **counts, "trainable_params_first": first, "trainable_params_last": counts["trainable_params"],
        "state_numbers": state.numbers, "state_bytes": state.bytes, "state_projected": state.projected,
        **{k: v for k, v in flops.items() if k != "train_phases"},
        "poster_gflops_train": poster[0], "poster_gflops_test": poster[1],
    }
    return row, method, tasks


def growth_rows(s: MethodSetup, cache: BackboneCache, task_counts: Sequence[int],
                done: Optional[ContinualMethod] = None) -> List[Dict[str, Any]]:
    """Parameter and state figures after the last of T tasks, for each T that splits the classes
    (``done``: the table's method, already in the last of its ``s.num_tasks`` tasks, is reused)."""
    rows = []
    for t_count in task_counts:
        if s.num_classes % t_count:
            continue
        tasks = make_tasks(s.num_classes, t_count)
        if done is not None and t_count == s.num_tasks:
            method = done
        else:
            backbone, _, _ = cache.get(s.backbone)
            try:
                method = build_method(s.name, s.config_for(t_count), backbone, s.num_classes, t_count)
            except ConfigError:
                continue  # e.g. a pool that cannot be split into this many task slices
            for t in tasks:
                method.begin_task(t)
        counts = parameter_counts(method)
        state = state_count(method, project_task=tasks[-1])
        rows.append({"benchmark": s.benchmark, "method": s.name, "num_tasks": t_count,
                     "added_params": counts["added_params"], "allocated_params": counts["allocated_params"],
                     "used_params": counts["used_params"], "trainable_params": counts["trainable_params"],
                     "state_numbers": state.numbers, "state_bytes": state.bytes})
    return rows


# --- throughput ----------------------------------------------------------------------------

def throughput_row(s: MethodSetup, args: Any, overrides: Dict[str, Any], train_phase: Optional[str]) -> Dict[str, Any]:
    """Measured images/s and memory on ``--device`` (the micro ViT on CPU unless asked otherwise)."""
    from benchmarks.run.protocol import resolve_device, resolve_precision
    from benchmarks.run.runner import hardware_string
    from benchmarks.run.throughput import measure, run_images
    from methods.backbones import MICRO_CONFIGS
    from methods.vit import PromptedViT

    device = resolve_device(args.device)
    name = getattr(args, "throughput_backbone", None) or (MICRO_THROUGHPUT_BACKBONE if device.type == "cpu" else s.backbone)
    cfg = s.cfg
    if split_name(name)[0] in MICRO_CONFIGS and split_name(s.backbone)[0] not in MICRO_CONFIGS:
        cfg, _ = resolve_method_config(s.name, s.benchmark, "quick", overrides)  # configs sized for the micro ViT
    vit = random_backbone(name, seed=0)
    backbone = PromptedViT(vit)
    method = build_method(s.name, cfg, backbone, s.num_classes, s.num_tasks)
    tasks = make_tasks(s.num_classes, s.num_tasks)
    for t in tasks:
        method.begin_task(t)
    phase = next((p for p in method.phases(tasks[-1]) if p.name == train_phase), None)
    amp = resolve_precision(args.precision, device)
    threads = getattr(args, "threads", None)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        tp = measure(method, tasks[-1], device, args.batch_size, amp, phase=phase)
        hardware = hardware_string(device)  # names the torch thread count in use
    finally:
        torch.set_num_threads(previous)
    row = {"train_img_s": tp.train_img_s, "infer_img_s": tp.infer_img_s, "peak_mem_mb": tp.peak_mem_mb,
           "batch_size": tp.batch_size, "precision": tp.precision, "hardware": hardware,
           "throughput_backbone": name, "est_run_hours": None}
    if split_name(name)[0] == split_name(s.backbone)[0]:
        per_class = DATASET_IMAGES_PER_CLASS.get(s.benchmark, (100, 50))
        tr = s.cfg.benchmark.train_per_class or per_class[0]
        te = s.cfg.benchmark.test_per_class or per_class[1]
        per_task = s.num_classes // s.num_tasks
        est = build_method(s.name, s.cfg, PromptedViT(vit), s.num_classes, s.num_tasks)
        imgs = run_images(est, tasks, s.cfg.train, [tr * per_task] * s.num_tasks, [te * per_task] * s.num_tasks)
        seconds = imgs["eval_images"] / tp.infer_img_s
        if imgs["train_images"]:
            seconds += imgs["train_images"] / tp.train_img_s if tp.train_img_s else float("nan")
        row["est_run_hours"] = seconds / 3600
    return row


# --- writing -------------------------------------------------------------------------------

def _m(n: Any) -> str:
    return "" if n is None else f"{int(n):,}"


def _g(v: Any, nd: int = 2) -> str:
    """``nd`` decimals, or 3 significant digits below 1 (micro-ViT counts are 0.005 GMACs)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v == 0 or abs(v) >= 1:
        return f"{v:.{nd}f}"
    return f"{v:.3g}"


def display_table(rows: List[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Header and cells of the human-readable table (markdown and LaTeX)."""
    header = ["method", "benchmark", "passes inf / train", "backbone params (#)", "added params (#)",
              "used params (#)", "trainable params first / last task (#)", "state (numbers / MB)",
              "inference GMACs", "inference GFLOPs", "train GMACs (fwd+bwd)", "train fwd GMACs",
              "paper-conv. GFLOPs train / test", "poster GFLOPs train / test"]
    has_tp = any(r.get("infer_img_s") is not None for r in rows)
    if has_tp:
        header += ["train img/s", "infer img/s", "peak mem (MB)", "est. run (h)"]
    cells = []
    for r in rows:
        name = r["method"] + (" †" if r["is_baseline"] else "") + (" *" if "(no " in r["preset_used"] else "")
        poster = f"{_g(r['poster_gflops_train'])} / {_g(r['poster_gflops_test'])}" if r["poster_gflops_test"] else "–"
        c = [name, r["benchmark"], f"{r['inference_passes']} / {r['train_passes']}" + (" (q)" if r["query_pass"] else ""),
             _m(r["backbone_params"]), _m(r["added_params"]), _m(r["used_params"]),
             f"{_m(r['trainable_params_first'])} / {_m(r['trainable_params_last'])}",
             f"{_m(r['state_numbers'])} / {r['state_bytes'] / 2**20:.2f}" + (" (proj.)" if r["state_projected"] else ""),
             _g(r["inference_gmacs"]), _g(r["inference_gflops"]), _g(r["train_gmacs"]), _g(r["train_fwd_gmacs"]),
             f"{_g(r['paper_convention_gflops_train'])} / {_g(r['paper_convention_gflops_inference'])}", poster]
        if has_tp:
            c += [_g(r.get("train_img_s"), 1), _g(r.get("infer_img_s"), 1), _g(r.get("peak_mem_mb"), 0),
                  _g(r.get("est_run_hours"), 2)]
        cells.append(c)
    return header, cells


NOTES = [
    "GMACs: 1e9 multiply-adds per image (fvcore's unit); GFLOPs = 2 × GMACs. Exact counts include every "
    "forward pass (query pass included) and the attention products QKᵀ and A·V with prefix columns.",
    "train GMACs = forward passes of a training step + backward (input gradients through the frozen backbone, "
    "weight gradients only for trainable weights), per training image, for the costliest phase of the last task.",
    "paper-conv.: the SMoPE poster's convention (module-hook counter without attention products, ×2, the poster's "
    "train pass counts); poster: its printed numbers (L2P row = Deep L2P++). See docs/cost.md.",
    "(q): runs an un-prompted query pass over the same frozen backbone (no extra parameters). "
    "†: baseline. *: no preset of this name for the method; its quick method config is used. "
    "(proj.): class statistics projected from the config after the last task (float64).",
]


def to_markdown(rows: List[Dict[str, Any]]) -> str:
    header, cells = display_table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in NOTES) + "\n"


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("†", r"$^\dagger$"),
                 ("×", r"$\times$"), ("ᵀ", r"$^\top$"), ("–", "--")):
        s = s.replace(a, b)
    return s


def to_latex(rows: List[Dict[str, Any]]) -> str:
    header, cells = display_table(rows)
    out = [r"\begin{table}[t]", r"\centering", r"\scriptsize", r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}",
           r"\toprule", " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(_tex_escape(c) for c in row) + r" \\" for row in cells]
    out += [r"\bottomrule", r"\end{tabular}",
            r"\caption{Cost per method. " + _tex_escape(" ".join(NOTES)) + "}", r"\label{tab:cost}", r"\end{table}"]
    return "\n".join(out) + "\n"


def plot_growth(growth: List[Dict[str, Any]], path_png: Path, path_pdf: Path) -> None:
    """Added parameters vs number of tasks, one line per method, readable in grayscale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(r["benchmark"] for r in growth)) or ["–"]
    fig, axes = plt.subplots(1, len(benches), figsize=(7.2 * len(benches), 3.8), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h"]
    grays = ["0.0", "0.35", "0.6"]
    for ax, bench in zip(axes[0], benches):
        series: Dict[Tuple[Tuple[int, int], ...], List[str]] = {}
        for m in dict.fromkeys(r["method"] for r in growth if r["benchmark"] == bench):
            pts = tuple(sorted((r["num_tasks"], r["added_params"]) for r in growth if r["benchmark"] == bench and r["method"] == m))
            series.setdefault(pts, []).append(m)  # identical lines are drawn once, labelled together
        zero = []
        for i, (pts, names) in enumerate(series.items()):
            if not pts or all(v == 0 for _, v in pts):
                zero += names
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[i % len(styles)], marker=markers[i % len(markers)],
                    color=grays[i % len(grays)], label=" = ".join(names), linewidth=1.5, markersize=6, markerfacecolor="white")
        ax.set_yscale("log")
        ax.set_xlabel("number of tasks T")
        ax.set_ylabel("added parameters (#, log scale)")
        ax.set_xticks(sorted({r["num_tasks"] for r in growth}))
        ax.set_title(bench + (f"  (0 added: {', '.join(zero)})" if zero else ""), fontsize=9)
        ax.grid(True, which="both", linewidth=0.3, color="0.8")
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path_png, dpi=150)
    fig.savefig(path_pdf)
    plt.close(fig)


def write_outputs(out: Path, rows: List[Dict[str, Any]], growth: List[Dict[str, Any]]) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    cols = CSV_COLUMNS + ([c for c in THROUGHPUT_COLUMNS if any(c in r for r in rows)])
    pd.DataFrame(rows).reindex(columns=cols).to_csv(out / "cost.csv", index=False)
    pd.DataFrame(growth).reindex(columns=GROWTH_COLUMNS).to_csv(out / "growth.csv", index=False)
    (out / "cost.md").write_text(to_markdown(rows))
    (out / "cost.tex").write_text(to_latex(rows))
    plot_growth(growth, out / "params_vs_tasks.png", out / "params_vs_tasks.pdf")


# --- the command ---------------------------------------------------------------------------

def main(args: Any) -> int:
    """Build the table for ``-b`` × ``-m``, write the files into ``--out`` and print the table."""
    t0 = time.time()
    benches = split_names(args.benchmark)
    if not benches:
        raise ConfigError("no benchmark given; pass -b NAME (see 'python bench.py list')")
    methods = expand_methods(split_names(args.method))
    overrides = parse_set(getattr(args, "set", None) or [])
    if getattr(args, "backbone", None):
        overrides = deep_merge(overrides, {"backbone": {"name": args.backbone}})
    task_counts = list(getattr(args, "tasks", None) or GROWTH_TASKS)
    if any(t < 1 for t in task_counts):
        raise ConfigError("--tasks expects positive task counts")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be positive")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ConfigError("--threads must be positive")
    todo = setups(benches, methods, args.preset, overrides)  # every config checked before any work
    if args.throughput:
        from benchmarks.run.protocol import resolve_device, resolve_precision

        resolve_precision(args.precision, resolve_device(args.device))
    cache = BackboneCache()
    rows: List[Dict[str, Any]] = []
    growth: List[Dict[str, Any]] = []
    estimates: List[str] = []
    for s in todo:
        with single_thread():  # counting only; the throughput below uses the normal threads
            row, method, tasks = cost_row(s, cache)
            growth += growth_rows(s, cache, task_counts, done=method)
        del method
        if args.throughput:
            row.update(throughput_row(s, args, overrides, row.get("train_phase")))
            if row.get("est_run_hours") is not None:
                train = f"{row['train_img_s']:.1f} train img/s and " if row["train_img_s"] else "no training, "
                h = row["est_run_hours"]
                when = f"{h:.2f} h" if h >= 1 else f"{60 * h:.1f} min"
                estimates.append(f"{s.benchmark}/{s.name}: about {when} for a full {s.preset_used} run at "
                                 f"{train}{row['infer_img_s']:.1f} eval img/s")
        rows.append(row)
    out = Path(args.out)
    write_outputs(out, rows, growth)
    print(to_markdown(rows))
    if args.throughput and rows:
        r = rows[0]
        print(f"throughput: {r['throughput_backbone']}, batch {r['batch_size']}, {r['precision']}, {r['hardware']}; "
              f"median of 5 timed runs after warm-up")
        if not estimates:
            print(f"no run-time estimate: throughput was measured on {r['throughput_backbone']}, the preset runs "
                  f"{r['backbone']} (pass --throughput-backbone {r['backbone']} to measure it)")
    for e in estimates:
        print(e)
    covered = ", ".join(dict.fromkeys(r["method"] for r in rows))
    print(f"cost report for {covered} written to {out} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0

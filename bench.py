#!/usr/bin/env python
"""PromptCL-Bench command line.

    python bench.py                      quick demo on CPU: every method + baselines on Fashion-MNIST
                                         (synthetic when its files are missing), cost, report
    python bench.py list                 methods, baselines, benchmarks, presets, backbones
    python bench.py run -b BENCH -m M1,M2 [--seeds 0 1 2] [--preset paper|quick] [--backbone NAME]
                        [--out runs] [--set key=value ...] [--device cpu|cuda] [--resume]
    python bench.py cost -b BENCH -m all [--backbone vit_base_patch16_224] [--out results/cost]
    python bench.py report [--runs runs] [--out results/report]
    python bench.py reproduce TABLE [--dry-run]
    python bench.py sweep ... --launcher local|slurm
    python bench.py gpu-check [--device cuda] [--budget 420] [--out results/gpu-check] [--ref-root DIR]
    python bench.py check-data -b BENCH [--data-root DIR]   open every image up front

Errors in user input print one sentence and exit with status 2, leaving no run directory behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from benchmarks.run.cli import (  # noqa: F401  (re-exported: bench.X is the CLI's public surface)
    EXIT_USAGE,
    UsageError,
    cli_overrides,
    expand_benchmarks,
    expand_methods,
    resolve_all,
    split_names,
    user_errors,
)


# --- commands ------------------------------------------------------------------------------

def cmd_list_presets(args: argparse.Namespace) -> int:
    """``list presets [--resolved]``: preset names, or every resolved cell with its sources."""
    from benchmarks.config import ConfigError, available_presets
    from benchmarks.data.datasets import list_datasets
    from benchmarks.tables.preset_listing import render_markdown, render_table, resolved_cells
    from methods.registry import list_methods

    def names(values, known, what):
        out = [n.strip() for v in (values or []) for n in v.split(",") if n.strip()]
        unknown = [n for n in out if n not in known]
        if unknown:
            raise ConfigError(f"unknown {what} '{unknown[0]}'; choose from {', '.join(known)}")
        return out or None

    if not args.resolved:
        for p in available_presets():
            print(p)
        return 0
    cells = resolved_cells(names(args.method, list_methods(), "method"), names(args.preset, available_presets(), "preset"),
                           names(args.benchmark, list_datasets(), "benchmark"))
    print(render_markdown(cells) if args.markdown else render_table(cells), end="" if args.markdown else "\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if getattr(args, "what", None) == "presets" or getattr(args, "resolved", False):
        return cmd_list_presets(args)
    from benchmarks.config import available_presets
    from benchmarks.data.datasets import _DEFAULT_TASKS, list_datasets
    from methods.backbones import MICRO_CONFIGS
    from methods.registry import get_method_class, list_methods

    def doc(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    print("methods:")
    for n in list_methods("method"):
        print(f"  {n:<14} {doc(get_method_class(n))}")
    print("baselines:")
    for n in list_methods("baseline"):
        print(f"  {n:<14} {doc(get_method_class(n))}")
    print("benchmarks:")
    for n in list_datasets():
        print(f"  {n:<14} default {_DEFAULT_TASKS[n]} tasks")
    print("presets:")
    for p in available_presets():
        print(f"  {p}")
    print("backbones:")
    for n in MICRO_CONFIGS:
        print(f"  {n:<28} CPU micro ViT, pretrained by the suite (backbone.pretrain: procedural classes, or in_domain: "
              f"the benchmark's held-out training images)")
    for n in ("vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_base_patch16_224.augreg_in21k", "any timm vit_* name[.tag]"):
        print(f"  {n}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Runs one after the other; under ``torchrun --nproc_per_node=N`` each run is data-parallel."""
    from benchmarks.run import distributed
    from benchmarks.run.runner import plan_all, prepare, run_prepared, validate_configs

    from benchmarks.run.store import check_out_folder

    benches = expand_benchmarks(split_names(args.benchmark))
    methods = expand_methods(split_names(args.method))
    cfgs = resolve_all(args, benches, methods, args.seeds)
    check_out_folder(args.out)
    dctx = distributed.setup(cfgs[0].device if cfgs else "auto")
    try:
        if len(cfgs) > 1:  # every config is checked before the first run writes anything
            with distributed.main_first(dctx):
                validate_configs(cfgs, tag=args.tag)
            if dctx.is_main:  # and every run folder's state (a damaged result, a live writer, ...)
                plan_all(cfgs, args.out, args.tag, args.resume, args.overwrite)
        for cfg in cfgs:
            cfg.device = distributed.rank_device(cfg.device, dctx)
            with distributed.main_first(dctx):  # downloads and weight caches: rank 0 first
                p = prepare(cfg, tag=args.tag)
            if not cfg.quiet and dctx.is_main:
                print(f"== {p.benchmark_label} / {p.method_label} / seed {cfg.seed} ==", flush=True)
            res = run_prepared(p, args.out, resume=args.resume, overwrite=args.overwrite)
            if dctx.is_main:
                m = res["metrics"]
                print(f"{p.benchmark_label:<14} {p.method_label:<16} seed {cfg.seed}: FAA {m['faa']:.2f}  CAA {m['caa']:.2f}  "
                      f"FFM {m['ffm']:.2f}  -> {Path(args.out) / p.benchmark_label / p.method_label / f'seed{cfg.seed}' / 'result.json'}",
                      flush=True)
    finally:
        distributed.teardown()
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from benchmarks.tables import cost_table

    return cost_table.main(args)


def cmd_report(args: argparse.Namespace) -> int:
    from reports import cli as report_cli

    return report_cli.main(args)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from benchmarks.tables import reproduce

    return reproduce.cli(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from benchmarks.run import sweep

    return sweep.cli(args)


def cmd_parity(args: argparse.Namespace) -> int:
    """Numbers of a method against its authors' code (benchmarks/tools/parity.py, docs/parity.md)."""
    from benchmarks.tools import parity

    return parity.run(args)


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """Speed, memory and precision of every method on one device in minutes (docs/speed.md)."""
    from benchmarks.tools import gpu_check

    return gpu_check.cli(args)


def cmd_check_data(args: argparse.Namespace) -> int:
    """Open every image of the benchmark(s) up front (progress bar), list the unreadable ones; exit 2 if any."""
    from benchmarks.config import resolve_config
    from benchmarks.data.datasets import check_data

    bad_total, checked = 0, []
    for b in expand_benchmarks(split_names(args.benchmark)):
        cfg = resolve_config("ncm", b, args.preset, cli_overrides(args))
        summary, bad = check_data(cfg.benchmark, progress=not args.quiet and sys.stderr.isatty())
        for path, reason in bad:
            print(f"unreadable: {path} ({reason})")
        print(summary, flush=True)
        bad_total += len(bad)
        checked.append(b)
    if bad_total:
        raise UsageError(f"{bad_total} image{'s' if bad_total > 1 else ''} of {', '.join(checked)} cannot be read "
                         f"(listed above); replace or remove them before a run")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The quick demo (benchmarks/tools/demo.py)."""
    from benchmarks.tools import demo

    return demo.main(args, parse=build_parser().parse_args, job=_demo_job)


def _demo_job(argv: List[str]) -> None:
    """One demo run in a worker process (single-threaded torch)."""
    import torch

    torch.set_num_threads(1)
    cmd_run(build_parser().parse_args(argv))


# --- parser --------------------------------------------------------------------------------

def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-b", "--benchmark", action="append", help="benchmark name(s), comma-separated")
    p.add_argument("-m", "--method", "--methods", dest="method", action="append", help="method name(s), comma-separated, or all / methods / baselines")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--preset", default="quick", help="quick (CPU) or paper")
    p.add_argument("--backbone", help="timm ViT name[.tag] or a micro backbone")
    p.add_argument("--checkpoint", help="local backbone checkpoint file (loaded strictly)")
    p.add_argument("--data-root", help="folder holding the data sets")
    p.add_argument("--out", default="runs")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override any config key, e.g. train.lr=0.01 method.pool_size=20")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="fp32 (default, as the reference codes) or bf16 autocast (opt-in; auto = bf16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--no-query-cache", action="store_true", help="recompute the query pass every time")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="run again even if a result exists")
    p.add_argument("--tag", help="suffix of the method's run folder (method@tag), for variants")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to <run dir>/tensorboard (needs the tensorboard package)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py", description="PromptCL-Bench: prompt-based continual learning, compared fairly.")
    parser.add_argument("--out", default="results/demo", help="demo output folder (no subcommand)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="demo seeds (no subcommand)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                        help="demo runs' precision (no subcommand; default: the preset's)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--demo-benchmark", default="auto", choices=["auto", "fashion_mnist", "synthetic"],
                        help="demo benchmark (no subcommand): auto = Fashion-MNIST when its files are there or downloadable")
    parser.add_argument("--data-root", default="data", help="demo data folder (no subcommand)")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="demo: config overrides for every run, "
                        "e.g. backbone.pretrain=procedural")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("list", help="list methods, baselines, benchmarks, presets, backbones")
    p.add_argument("what", nargs="?", choices=["presets"], help="presets: the presets (with --resolved, every cell)")
    p.add_argument("--resolved", action="store_true",
                   help="per method x preset x benchmark: the effective settings and the preset file of each")
    p.add_argument("-m", "--method", "--methods", dest="method", action="append", help="only these methods (comma-separated)")
    p.add_argument("-b", "--benchmark", action="append", help="only these benchmarks (comma-separated)")
    p.add_argument("--preset", action="append", help="only these presets (comma-separated)")
    p.add_argument("--markdown", action="store_true", help="the full docs/presets.md text")

    p = sub.add_parser("run", help="train and evaluate methods on a benchmark")
    add_run_options(p)

    p = sub.add_parser("check-data", help="open every image of a benchmark up front; list the unreadable ones")
    p.add_argument("-b", "--benchmark", action="append", help="benchmark name(s), comma-separated")
    p.add_argument("--data-root", help="folder holding the data sets")
    p.add_argument("--preset", default="quick", help="preset whose benchmark settings (split, split file) apply")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="benchmark settings, e.g. benchmark.split=file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("cost", help="parameters, FLOPs, throughput and memory per method")
    p.add_argument("-b", "--benchmark", action="append", help="benchmark name(s), comma-separated")
    p.add_argument("-m", "--method", "--methods", dest="method", action="append", help="method name(s), comma-separated, or all / methods / baselines")
    p.add_argument("--backbone", default=None, help="timm ViT name[.tag] (random weights; default: the preset's)")
    p.add_argument("--preset", default="paper", help="method configs from this preset (quick config where it has none)")
    p.add_argument("--tasks", type=int, nargs="+", default=[5, 10, 20], help="task counts for the growth table")
    p.add_argument("--out", default="results/cost", help="output folder (cost.csv, growth.csv, tables)")
    p.add_argument("--device", default="cpu", help="device of the throughput measurement")
    p.add_argument("--throughput", action="store_true", help="also measure images/s and memory, and estimate a run's wall-clock")
    p.add_argument("--throughput-backbone", default=None,
                   help="backbone of the throughput measurement (default: the micro ViT on CPU, the table's on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads during the throughput measurement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE")

    p = sub.add_parser("report", help="tables, plots and report.html from stored results (no training)")
    p.add_argument("--runs", default="runs", help="folder searched recursively for result.json")
    p.add_argument("--out", default="results/report", help="output folder (report.html, report.md, tables/, plots/)")
    p.add_argument("--cost", default=None, help="folder of a 'bench.py cost' output to include")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired per-seed difference of two methods")
    p.add_argument("--metrics", default=None, help="main-table metrics, comma-separated (default faa,caa,ffm; "
                   "also ffm_prior, coda_f, bwt, tii_final)")
    p.add_argument("--references", default=None, help="folder of reported-number YAML files (default benchmarks/tables/references)")

    p = sub.add_parser("reproduce", help="run the grid behind a paper table, then report it")
    p.add_argument("table", nargs="?", help="table name (benchmarks/tables/references/tables/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, their status, files and GPU-time estimate")
    p.add_argument("--report-only", action="store_true", help="render the table from the finished runs, launch nothing")
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="results/reproduce", help="output folder (<table>.md, .tex, .csv)")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"])
    p.add_argument("--data-root", default="data")
    p.add_argument("--checkpoint-dir", default="checkpoints", help="folder of local backbone checkpoints (iBOT, DINO)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="instead of the table's seeds")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override a config key in every run")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--gpu-tflops", type=float, default=None, help="sustained TFLOP/s assumed by the estimate (default 100)")
    p.add_argument("--no-estimate", action="store_true", help="dry run without the cost-model estimate")
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--time-limit", type=int, default=240, help="minutes per job (slurm)")
    p.add_argument("--gpus", type=int, default=None, help="local: N parallel processes, one per GPU; slurm: GPUs per job")
    p.add_argument("--cpus-per-task", type=int, default=8, help="slurm: CPU cores per job")
    p.add_argument("--array-parallelism", type=int, default=64, help="slurm: jobs of the array running at once")
    p.add_argument("--submitit-backend", default="slurm", choices=["slurm", "local", "debug"])
    p.add_argument("--no-wait", action="store_true", help="slurm: submit the array and return")

    p = sub.add_parser("gpu-check", help="speed, memory and bf16 precision of every method on one GPU, within a time budget")
    from benchmarks.tools.gpu_check import add_arguments as gpu_check_arguments

    gpu_check_arguments(p)

    p = sub.add_parser("sweep", help="benchmarks × methods × seeds, skipping finished runs")
    add_run_options(p)
    p.add_argument("--grid", help="YAML grid file: benchmarks, methods (names or {name, tag, set}), seeds, presets, set")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"])
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--time-limit", type=int, default=240, help="minutes per job (slurm)")
    p.add_argument("--gpus", type=int, default=None,
                   help="local: N parallel processes, one per visible GPU; slurm: GPUs per job (default 1)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="slurm: CPU cores per job")
    p.add_argument("--array-parallelism", type=int, default=64, help="slurm: jobs of the array running at once")
    p.add_argument("--submitit-backend", default="slurm", choices=["slurm", "local", "debug"],
                   help="slurm launcher through submitit's SLURM, local-process or in-process (debug) executor")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit the array and return without a summary")
    p.add_argument("--dry-run", action="store_true", help="validate and print what would run, launch nothing")

    p = sub.add_parser("parity", help="compare a method's numbers with its authors' code (--ref checkout)")
    from benchmarks.tools.parity import add_arguments as add_parity_arguments

    add_parity_arguments(p)
    return parser


COMMANDS = {
    None: cmd_demo,
    "list": cmd_list,
    "run": cmd_run,
    "cost": cmd_cost,
    "report": cmd_report,
    "reproduce": cmd_reproduce,
    "sweep": cmd_sweep,
    "parity": cmd_parity,
    "gpu-check": cmd_gpu_check,
    "check-data": cmd_check_data,
}


# pip names of the modules whose import name differs
_PIP_NAMES = {"yaml": "pyyaml", "sklearn": "scikit-learn", "PIL": "pillow"}


def missing_package(e: ModuleNotFoundError) -> str:
    """One sentence naming the package a command needs and this machine lacks."""
    mod = (e.name or str(e)).split(".")[0]
    return f"error: this command needs the Python package '{mod}', which is not installed (pip install {_PIP_NAMES.get(mod, mod)})."


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        from benchmarks.run.distributed import env_rank
        from benchmarks.run.protocol import NonFiniteLossError
        from benchmarks.run.runner import RunInterrupted
    except ModuleNotFoundError as e:  # e.g. a bare GPU machine without timm
        print(missing_package(e), file=sys.stderr, flush=True)
        return EXIT_USAGE

    args = build_parser().parse_args(argv)
    say = env_rank() == 0  # under torchrun every rank fails alike; rank 0 tells the user

    def tell(msg: str) -> None:
        if say:
            print(msg, file=sys.stderr, flush=True)

    try:
        return COMMANDS[args.command](args) or 0
    except user_errors() as e:
        tell(f"error: {str(e).strip().rstrip('.')}.")
        return EXIT_USAGE
    except NonFiniteLossError as e:  # a diverged run, not a bug: one line, status 1
        tell(f"error: {str(e).strip().rstrip('.')}.")
        return 1
    except RunInterrupted as e:  # SIGINT / SIGTERM / SIGUSR2 after saving a checkpoint
        tell(f"interrupted: {e}.")
        return e.exit_code
    except KeyboardInterrupt:
        tell("interrupted")
        return 130
    except ModuleNotFoundError as e:  # an optional package (fvcore for FLOP counts, submitit for slurm ...)
        tell(missing_package(e))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

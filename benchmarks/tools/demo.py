"""The quick demo (``python bench.py`` / ``make demo``): every method and baseline on Fashion-MNIST
(the synthetic benchmark when its files are missing), quick preset, seeds 0-2, in single-threaded
worker processes, then the ViT-B/16 cost table and the report, with the finetune < method < joint
check printed under the main table."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Sequence

from benchmarks.run.cli import UsageError, cli_overrides


def demo_benchmark(choice: str, data_root: str) -> tuple:
    """(benchmark, why) for the demo: Fashion-MNIST when its files are there (or downloadable),
    else the synthetic benchmark; ``why`` is the sentence the demo opens with."""
    from benchmarks.data.datasets import FASHION_MNIST_DEBIAN, find_fashion_mnist, offline

    if choice == "synthetic":
        return "synthetic", "the synthetic benchmark (asked for with --demo-benchmark synthetic)"
    files = find_fashion_mnist(data_root)
    if files is None and not offline():
        try:  # torchvision's download, into <data_root>/FashionMNIST/raw
            from torchvision.datasets import FashionMNIST

            print(f"demo: Fashion-MNIST is not installed; downloading it into {data_root} ...", flush=True)
            FashionMNIST(data_root, train=True, download=True)
            FashionMNIST(data_root, train=False, download=True)
        except Exception as e:
            print(f"demo: the download failed ({type(e).__name__})", flush=True)
        files = find_fashion_mnist(data_root)
    if files is not None:
        return "fashion_mnist", f"Fashion-MNIST, because its files are in {files['train_images'].parent}"
    if choice == "fashion_mnist":
        raise UsageError(f"--demo-benchmark fashion_mnist: the files are neither in {data_root} nor in {FASHION_MNIST_DEBIAN} "
                         f"and could not be downloaded; install them with 'apt-get install dataset-fashion-mnist'")
    how = "downloads are disabled by PROMPTCL_OFFLINE" if offline() else "the download failed"
    return "synthetic", (f"the synthetic benchmark, because Fashion-MNIST is not installed ({FASHION_MNIST_DEBIAN} is empty: "
                         f"apt-get install dataset-fashion-mnist) and {how}; its ranking of the methods is not "
                         f"meaningful (docs/data.md §6)")


def main(args: argparse.Namespace, parse: Callable[[List[str]], argparse.Namespace],
         job: Callable[[List[str]], None]) -> int:
    """The quick demo: every method and baseline on Fashion-MNIST (the synthetic benchmark when the
    files are missing), quick preset, the ViT-B/16 cost table, then the report. Ends by printing
    the main table, the finetune < prompt method < joint check and the path of report.html.

    ``parse`` is the command line's parser (``bench.py``'s, passed in so that this module never
    imports the CLI script) and ``job`` runs one ``bench.py run`` argument list in a worker process
    (a top-level function of the script, so that spawned workers can import it)."""
    from benchmarks.config import resolve_config
    from methods.registry import list_methods
    from reports import cli as report_cli

    t0 = time.time()
    out = Path(args.out)
    bench, why = demo_benchmark(args.demo_benchmark, args.data_root)
    root = args.data_root
    if bench == "fashion_mnist":  # point the runs at the folder found (no "system copy" note per run)
        from benchmarks.data.datasets import find_fashion_mnist

        root = str(find_fashion_mnist(args.data_root)["train_images"].parent)
    extra = ["--data-root", root] + (["--set", *args.set] if args.set else [])
    print(f"demo: {why}", flush=True)
    # the suite-pretrained backbone is built once here, with every core, before the single-threaded workers
    cfg = resolve_config("finetune", bench, "quick", cli_overrides(parse(["run", *extra])))
    from methods.backbones import create_backbone

    what = (f"pretrained in-domain on {cfg.benchmark.pretrain_holdout:,} {bench} training images per class, held out of "
            f"the CL stream" if cfg.backbone.pretrain == "in_domain" else "pretrained on procedural classes disjoint from every task")
    print(f"demo: backbone {cfg.backbone.name}, {what} (methods/pretrain.py; pretrained once, then cached)", flush=True)
    _, info = create_backbone(cfg.backbone, benchmark=cfg.benchmark)
    print(f"demo: backbone weights {info.checkpoint}", flush=True)
    jobs = [["run", "-b", bench, "-m", m, "--preset", "quick", "--out", str(out / "runs"), "--seeds", str(s), "--quiet", *extra]
            for m in demo_order(list_methods()) for s in args.seeds]
    if getattr(args, "precision", None):  # opt-in bf16 autocast on the CPU (docs/speed.md says when it pays)
        jobs = [j + ["--precision", args.precision] for j in jobs]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(len(jobs), cores))
    print(f"demo: {len(jobs)} runs (every method and baseline x seeds {' '.join(map(str, args.seeds))}, quick preset) "
          f"in {workers} single-threaded worker process{'es' if workers > 1 else ''}; results already in "
          f"{out / 'runs'} are reused", flush=True)
    if workers == 1:
        for j in jobs:
            job(j)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # the micro ViT's ops are too small for intra-op threads to pay off; one single-threaded run
        # per core keeps every core busy instead
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in [pool.submit(job, j) for j in jobs]:
                f.result()  # re-raises a worker's error here
    cost_dir = out / "cost"
    from benchmarks.tables import cost_table

    # ImageNet-R (200 classes) is the setting of the SMoPE poster's efficiency table, so the
    # report's reproduction table compares our parameter / GFLOPs counts with the poster's
    cost_args = parse(["cost", "-b", "imagenet_r", "-m", "all", "--backbone", "vit_base_patch16_224", "--out", str(cost_dir)])
    try:
        cost_table.main(cost_args)
    except Exception as e:  # the demo still reports the runs; the failure is named, not hidden
        print(f"cost table skipped: {type(e).__name__}: {e}", file=sys.stderr)
    # the paired per-seed comparison: the suite's featured method against its strongest prompt baseline
    pair = ("smope", "coda_prompt") if {"smope", "coda_prompt"} <= set(list_methods()) and len(args.seeds) > 1 else None
    rep = report_cli.build_report(out / "runs", out / "report", cost_dir if (cost_dir / "cost.csv").exists() else None,
                                  compare=pair)
    print(f"demo finished in {time.time() - t0:.0f}s ({len(list_methods())} methods and baselines, seeds "
          f"{' '.join(map(str, args.seeds))}; report in {rep.seconds:.1f}s)\n")
    print(rep.main_markdown)
    for line in demo_summary(out / "runs", bench, args.seeds):
        print(line)
    print(f"report: {rep.html.resolve()}")
    return 0


def demo_summary(runs: Path, bench: str, seeds: Sequence[int]) -> List[str]:
    """Where the throughput was measured, and each prompt method's mean FAA against finetune's
    and joint's (the ordering the papers show: finetune < prompt method < joint)."""
    import json

    import numpy as np

    from methods.registry import list_methods

    res = {}
    for m in list_methods():
        files = [runs / bench / m / f"seed{s}" / "result.json" for s in seeds]
        res[m] = [json.loads(f.read_text()) for f in files if f.exists()]
    lines = []
    one = next((r[0] for r in res.values() if r), None)
    tp = (one or {}).get("cost", {}).get("throughput")
    if tp:
        lines.append(f"throughput (img/s): measured at the end of each run on {tp['device']}, {tp['precision']}, "
                     f"batch {tp['batch_size']}")
    faa = {m: float(np.mean([r["metrics"]["faa"] for r in rs])) for m, rs in res.items() if rs}
    if "finetune" in faa and "joint" in faa:
        lo, hi = faa["finetune"], faa["joint"]
        from methods.registry import get_method_class

        methods = [m for m in list_methods("method") if m in faa]  # the registered methods (not baselines)
        prompt = [m for m in methods if get_method_class(m).prompt_based]
        inside = [m for m in prompt if lo < faa[m] < hi]
        lines.append(f"mean FAA over seeds {' '.join(map(str, seeds))}: finetune {lo:.2f} < prompt method < joint {hi:.2f} "
                     f"holds for {len(inside)}/{len(prompt)} prompt methods: "
                     + ", ".join(f"{m} {faa[m]:.2f}{'' if m in inside else ' (outside)'}" for m in prompt))
        others = [m for m in methods if m not in prompt]
        if others:
            lines.append("not prompt methods (first-session adaptation / backbone training, issue 22): "
                         + ", ".join(f"{m} {faa[m]:.2f}" for m in others))
    return lines


# slowest first, so the last run to finish is a short one (longest-processing-time-first scheduling)
_DEMO_SLOW_FIRST = ("hide_prompt", "coda_prompt", "smope", "joint", "vq_prompt", "dualprompt", "l2p", "finetune",
                    "linear_probe", "ncm")


def demo_order(methods: Sequence[str]) -> List[str]:
    """The demo's methods, slowest first (unknown methods, e.g. newly registered ones, go first)."""
    rank = {m: i for i, m in enumerate(_DEMO_SLOW_FIRST)}
    return sorted(methods, key=lambda m: rank.get(m, -1))

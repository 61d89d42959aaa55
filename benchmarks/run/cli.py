"""Helpers shared by the command-line entry points: user-error types and exit status, name lists,
``--set``/flag overrides, up-front config resolution.

They live here, not in bench.py, so that library modules (sweep, cost report, tools) can use them
without importing the CLI script (no module imports bench.py).
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad user input: printed as one sentence, exit status 2."""


def user_errors() -> tuple:
    """Exception types whose message is meant for the user (exit status 2, no traceback)."""
    from benchmarks.config import ConfigError
    from benchmarks.data.datasets import DataError
    from benchmarks.run.runner import RunError
    from benchmarks.run.store import StoreError  # a second writer, a damaged checkpoint, a full disk
    from methods.backbones import BackboneError
    from methods.checkpoints import CheckpointError
    from methods.registry import UnknownMethodError

    return (UsageError, ConfigError, DataError, RunError, StoreError, BackboneError, CheckpointError, UnknownMethodError)


def split_names(values: Optional[Sequence[str]]) -> List[str]:
    out: List[str] = []
    for v in values or []:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def expand_methods(names: List[str]) -> List[str]:
    from methods.registry import get_method_class, list_methods

    if not names:
        raise UsageError("no method given; pass -m NAME[,NAME...] or -m all")
    out: List[str] = []
    for n in names:
        if n == "all":
            out += list_methods()
        elif n in ("methods", "baselines"):
            out += list_methods(n[:-1])
        else:
            get_method_class(n)  # raises with the list of registered names
            out.append(n)
    return list(dict.fromkeys(out))


def expand_benchmarks(names: List[str]) -> List[str]:
    from benchmarks.data.datasets import list_datasets

    if not names:
        raise UsageError("no benchmark given; pass -b NAME (see 'python bench.py list')")
    for n in names:
        if n not in list_datasets():
            raise UsageError(f"unknown benchmark '{n}'; available benchmarks: {', '.join(list_datasets())}")
    return names


def cli_overrides(args: argparse.Namespace) -> dict:
    """--set plus the dedicated flags, as one nested override mapping."""
    from benchmarks.config import deep_merge, parse_set

    over: dict = {}
    if getattr(args, "backbone", None):
        over = deep_merge(over, {"backbone": {"name": args.backbone}})
    if getattr(args, "checkpoint", None):
        over = deep_merge(over, {"backbone": {"checkpoint": args.checkpoint, "pretrained": "file"}})
    if getattr(args, "data_root", None):
        over = deep_merge(over, {"benchmark": {"data_root": args.data_root}})
    for flag in ("device", "precision"):
        if getattr(args, flag, None):
            over[flag] = getattr(args, flag)
    if getattr(args, "compile", False):
        over["compile"] = True
    if getattr(args, "quiet", False):
        over["quiet"] = True
    if getattr(args, "no_query_cache", False):
        over["query_cache"] = False
    if getattr(args, "tensorboard", False):
        over["tensorboard"] = True
    return deep_merge(over, parse_set(getattr(args, "set", None) or []))


def resolve_all(args: argparse.Namespace, benches: List[str], methods: List[str], seeds: List[int]):
    """Resolve and validate every (benchmark, method, seed) config before anything runs."""
    from benchmarks.config import resolve_config

    over = cli_overrides(args)
    cfgs = []
    for b in benches:
        for m in methods:
            for s in seeds:
                cfg = resolve_config(m, b, args.preset, over)
                cfg.seed = s
                cfgs.append(cfg)
    return cfgs

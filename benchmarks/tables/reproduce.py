"""``bench.py reproduce TABLE``: the runs behind one paper table, then paper vs ours.

A table definition (``benchmarks/tables/references/tables/<name>.yaml``, format in docs/reproduce.md)
names the paper and table, its **columns** (benchmark, task count, split, backbone checkpoint,
metrics) and its **rows** (the paper's row label; our registered method with its preset and
settings, or ``not_implemented: REASON``). The reported numbers are *not* repeated there: they are
looked up in the reported-number files ``benchmarks/tables/references/*.yaml`` (:mod:`reports.references`)
by the row's label (``reported_as``), benchmark, task count, metric and, where the column says so,
the reference's backbone. A number missing from those files may be given in the table file
(``reported:``) with its source tag; if the files hold it too, the two must agree.

Three things per table:

* ``--dry-run``: every run (row × column × seed; the preset, overrides and checkpoint are those of
  the row and column), whether it is done (``result.json`` with the same config hash in the runs
  folder), the data and checkpoint files it needs and whether they are present, and an estimated
  GPU time from the cost model (:func:`estimate_run`);
* the default: launch the missing runs through :mod:`benchmarks.run.sweep` (its local, multi-GPU and
  SLURM launchers; finished runs are skipped, interrupted ones resumed), then render the table;
* ``kind: cost`` tables (the SMoPE efficiency table) need no run: every implemented row is built on
  a randomly initialised backbone of the column's architecture and counted with
  :mod:`benchmarks.cost.engine` (exact fvcore MACs and the SMoPE poster's convention), fully offline.

Output: ``<out>/<table>.md``, ``.tex`` and ``.csv`` (:mod:`reports.render`; ``--out`` defaults to
``results/reproduce``), and the markdown on stdout. Rows the suite does not implement stay in the table with the paper's numbers and
"not implemented".
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

from benchmarks.config import ConfigError, RunConfig, available_presets, deep_merge, parse_set, resolve_config

ROOT = Path(__file__).resolve().parents[2]
TABLE_DIR = Path(__file__).resolve().parent / "references" / "tables"
REFERENCE_DIR = Path(__file__).resolve().parent / "references"

# Sustained throughput assumed by the GPU-time estimate, in 1e12 FLOPs (= 2 MACs) per second. About
# a third of an A100's dense bf16 peak (312) or a seventh of an H100 SXM's (989): what a frozen-ViT
# prompt method with a data loader typically sustains. Not measured here; override --gpu-tflops.
DEFAULT_GPU_TFLOPS = 100.0

RUN_METRICS = ("faa", "caa", "ffm", "ffm_prior", "coda_f", "bwt")
COST_METRICS = ("added_params_m", "train_gflops_paper", "inference_gflops_paper")
TABLE_KEYS = {"name", "paper", "table", "kind", "references", "description", "seeds", "columns", "rows", "notes"}
COLUMN_KEYS = {"id", "label", "benchmark", "num_tasks", "split", "backbone", "checkpoint", "checkpoint_label",
               "reference_backbone", "metrics", "tag", "set", "not_available"}
ROW_KEYS = {"label", "ours", "not_implemented", "preset", "tag", "set", "set_for", "reported_as", "reported", "note"}
SPLITS = {"official": "default", "default": "default", "random": "random", "file": "file"}  # column split -> benchmark.split


# --- the table definition ------------------------------------------------------------------

@dataclass
class Column:
    """One setting of the table (benchmark × task count × split × checkpoint) and its metrics."""

    id: str
    label: str
    benchmark: str
    num_tasks: int
    metrics: List[str]
    split: Optional[str] = None
    backbone: Optional[str] = None  # timm name[.tag]
    checkpoint: Optional[Dict[str, Any]] = None  # local file: {file, format, arch, url}
    checkpoint_label: Optional[str] = None
    reference_backbone: Optional[str] = None  # the references' ``backbone`` to match, when they vary
    tag: Optional[str] = None
    set: List[str] = field(default_factory=list)
    not_available: Optional[str] = None

    @property
    def checkpoint_text(self) -> str:
        if self.checkpoint_label:
            return self.checkpoint_label
        return self.backbone or (self.checkpoint or {}).get("file", "preset's")


@dataclass
class Row:
    """One row: the paper's label and either our method (preset, settings) or a reason it has none."""

    label: str
    ours: Optional[str] = None
    not_implemented: Optional[str] = None
    preset: Optional[str] = None
    tag: Optional[str] = None
    set: List[str] = field(default_factory=list)
    set_for: Dict[str, List[str]] = field(default_factory=dict)  # column id -> extra settings
    reported_as: Optional[str] = None  # label in the references; {checkpoint} / {benchmark} filled per column
    reported: Dict[str, Dict[str, Dict[str, Any]]] = field(default_factory=dict)  # column id -> metric -> number
    note: Optional[str] = None

    def reference_label(self, col: Column) -> str:
        return (self.reported_as or self.label).format(checkpoint=col.checkpoint_label or "", benchmark=col.benchmark)


@dataclass
class TableDef:
    name: str
    paper: str
    table: str
    references: str
    columns: List[Column]
    rows: List[Row]
    kind: str = "runs"  # runs | cost
    description: str = ""
    seeds: List[int] = field(default_factory=lambda: [0])
    notes: List[str] = field(default_factory=list)
    path: Optional[Path] = None


def list_tables(directory: Path = TABLE_DIR) -> List[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def _strict(d: Any, allowed: set, where: str) -> Dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {d!r}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where} has unknown key '{unknown[0]}'; valid keys are: {', '.join(sorted(allowed))}")
    return d


def _str_list(v: Any, where: str) -> List[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f"{where} must be a list of key=value strings, got {v!r}")
    return list(v)


def load_table(name: str, directory: Path = TABLE_DIR) -> TableDef:
    """The table ``name`` (a name in ``directory`` or a path to a YAML file); ConfigError otherwise."""
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else Path(directory) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown table '{name}'; available tables: {', '.join(list_tables(directory)) or 'none'}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"table file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    _strict(doc, TABLE_KEYS, f"table file {path.name}")
    for key in ("name", "paper", "table", "references", "columns", "rows"):
        if not doc.get(key):
            raise ConfigError(f"table file {path.name} lacks '{key}'")
    cols = []
    for i, c in enumerate(doc["columns"]):
        where = f"{path.name} column {i + 1}"
        c = dict(_strict(c, COLUMN_KEYS, where))
        for key in ("id", "benchmark", "num_tasks", "metrics"):
            if c.get(key) is None:
                raise ConfigError(f"{where} lacks '{key}'")
        if not isinstance(c["num_tasks"], int) or isinstance(c["num_tasks"], bool) or c["num_tasks"] < 1:
            raise ConfigError(f"{where}: num_tasks must be a positive integer, got {c['num_tasks']!r}")
        c["metrics"] = [c["metrics"]] if isinstance(c["metrics"], str) else list(c["metrics"])
        c["set"] = _str_list(c.get("set"), f"{where} 'set'")
        c.setdefault("label", c["id"])
        cols.append(Column(**c))
    rows = []
    for i, r in enumerate(doc["rows"]):
        where = f"{path.name} row {i + 1}"
        r = dict(_strict(r, ROW_KEYS, where))
        if not r.get("label"):
            raise ConfigError(f"{where} lacks 'label'")
        r["set"] = _str_list(r.get("set"), f"{where} 'set'")
        r["set_for"] = {str(k): _str_list(v, f"{where} set_for.{k}") for k, v in (r.get("set_for") or {}).items()}
        r["reported"] = r.get("reported") or {}
        rows.append(Row(**r))
    seeds = doc.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"table file {path.name}: seeds must be a non-empty list of integers")
    return TableDef(name=str(doc["name"]), paper=str(doc["paper"]), table=str(doc["table"]), references=str(doc["references"]),
                    columns=cols, rows=rows, kind=str(doc.get("kind", "runs")), description=str(doc.get("description", "")).strip(),
                    seeds=seeds, notes=list(doc.get("notes") or []), path=path)


# --- reported numbers ----------------------------------------------------------------------

@dataclass
class Reported:
    """A reported number and where it comes from."""

    value: float
    std: Optional[float]
    tag: str
    source: str
    origin: str  # the file it was read from
    note: Optional[str] = None


def load_refs(t: TableDef, directory: Path = REFERENCE_DIR) -> list:
    from reports.references import load_reference_file

    # next to the table file first (a table kept outside the suite brings its own numbers)
    local = t.path.parent / t.references if t.path is not None else None
    path = local if local is not None and local.is_file() and local.parent != TABLE_DIR else Path(directory) / t.references
    if not path.is_file():
        raise ConfigError(f"table {t.name} points to the reported-number file {t.references}, which is not in {directory}")
    return load_reference_file(path)


def _candidates(refs: list, row: Row, col: Column, metric: str) -> list:
    label = row.reference_label(col)
    return [r for r in refs if r.method == label and r.benchmark == col.benchmark and r.num_tasks == col.num_tasks
            and r.metric == metric and (col.reference_backbone is None or r.backbone == col.reference_backbone)]


def reported(t: TableDef, refs: list, row: Row, col: Column, metric: str) -> Optional[Reported]:
    """The number the paper reports for (row, column, metric), or None when it reports none."""
    found = _candidates(refs, row, col, metric)
    if len(found) > 1:
        raise ConfigError(f"table {t.name}: {len(found)} entries of {t.references} match row '{row.label}', column "
                          f"'{col.id}', metric {metric}; give the column a reference_backbone or the row a reported_as")
    inline = (row.reported.get(col.id) or {}).get(metric)
    if found:
        r = found[0]
        if inline is not None and not math.isclose(float(inline.get("value", math.nan)), r.value, abs_tol=1e-9):
            raise ConfigError(f"table {t.name}: row '{row.label}' gives {metric} = {inline.get('value')} for column "
                              f"'{col.id}', but {t.references} has {r.value}; keep one number")
        return Reported(r.value, r.std, r.tag, r.source, r.file, r.note)
    if inline is None:
        return None
    if not isinstance(inline, dict) or "value" not in inline or str(inline.get("tag")) not in ("V", "R") or not inline.get("source"):
        raise ConfigError(f"table {t.name}: row '{row.label}' reported {col.id}.{metric} needs value, tag (V or R) and source")
    return Reported(float(inline["value"]), None if inline.get("std") is None else float(inline["std"]), str(inline["tag"]),
                    str(inline["source"]), t.path.name if t.path else t.name, inline.get("note"))


# --- configs and validation ----------------------------------------------------------------

_PRESET_MEMO: Dict[Tuple[str, int], Dict[str, Any]] = {}


@contextlib.contextmanager
def cached_presets() -> Iterator[None]:
    """While active, each preset YAML file is parsed once (per modification time).

    A table resolves dozens of configs and ``resolve_config`` parses the preset files twice per
    call; PyYAML's pure-Python parser made that 90% of a dry run. Callers get deep copies, so the
    cache cannot be altered through them.
    """
    import benchmarks.config as C

    if getattr(C.load_yaml, "_reproduce_cache", False):  # already active (nested use)
        yield
        return
    original = C.load_yaml
    memo = _PRESET_MEMO

    def load_yaml(path: Path) -> Dict[str, Any]:
        key = (str(path), Path(path).stat().st_mtime_ns)
        if key not in memo:
            memo[key] = original(path)
        return copy.deepcopy(memo[key])

    load_yaml._reproduce_cache = True  # type: ignore[attr-defined]
    C.load_yaml = load_yaml
    try:
        yield
    finally:
        C.load_yaml = original


def run_overrides(row: Row, col: Column, data_root: str, checkpoint_dir: str, extra: Sequence[str] = ()) -> Dict[str, Any]:
    """The overrides of one (row, column) run on top of the row's preset, in order of precedence:
    the column's setting (task count, checkpoint, its ``set``), then the row's ``set``, its
    ``set_for`` of this column, and ``extra`` (the command line's ``--set``). The split is applied
    by :func:`resolve_run`."""
    over: Dict[str, Any] = {"benchmark": {"num_tasks": col.num_tasks, "data_root": data_root}}
    if col.checkpoint:
        ck = col.checkpoint
        over["backbone"] = {"name": ck.get("arch", "vit_base_patch16_224"), "pretrained": "file",
                            "checkpoint": str(Path(checkpoint_dir) / ck["file"]), "checkpoint_format": ck.get("format", "auto")}
    elif col.backbone:
        over["backbone"] = {"name": col.backbone}
    for items in (col.set, row.set, row.set_for.get(col.id, []), list(extra)):
        over = deep_merge(over, parse_set(items))
    return over


def run_tag(row: Row, col: Column) -> Optional[str]:
    parts = [p for p in (row.tag, col.tag) if p]
    return "-".join(parts) or None


def resolve_run(t: TableDef, row: Row, col: Column, seed: int, data_root: str, checkpoint_dir: str,
                extra: Sequence[str] = ()) -> RunConfig:
    over = run_overrides(row, col, data_root, checkpoint_dir, extra)
    cfg = resolve_config(row.ours, col.benchmark, row.preset or "paper", over)
    want = SPLITS.get(col.split) if col.split else None
    if want and not same_split(col.benchmark, cfg.benchmark.split, want):
        # set only when the preset resolves another split: an equivalent spelling would change the
        # config hash and stop plain 'bench.py run' results from counting as done
        cfg = resolve_config(row.ours, col.benchmark, row.preset or "paper",
                             deep_merge({"benchmark": {"split": want}}, over))
    cfg.seed = seed
    return cfg


def same_split(benchmark: str, have: str, want: str) -> bool:
    """``default`` is ImageNet-R's random 80/20 split and every other data set's official one."""
    return have == want or (benchmark == "imagenet_r" and {have, want} <= {"default", "random"})


def validate_table(t: TableDef, refs: Optional[list] = None) -> None:
    with cached_presets():
        _validate_table(t, refs)


def _validate_table(t: TableDef, refs: Optional[list] = None) -> None:
    """Every row is a registered method or marked not implemented, every column a known benchmark
    (or marked not available) with known metrics, every preset exists, every (row, column) config
    resolves, run folders are not shared by different configs, and every reported lookup is
    unambiguous and consistent. Raises ConfigError naming the table and the offending entry."""
    from benchmarks.data.datasets import list_datasets
    from benchmarks.run.runner import run_path
    from benchmarks.run.store import config_hash
    from methods.registry import list_methods

    if t.kind not in ("runs", "cost"):
        raise ConfigError(f"table {t.name}: kind must be runs or cost, got '{t.kind}'")
    refs = load_refs(t) if refs is None else refs
    allowed = COST_METRICS if t.kind == "cost" else RUN_METRICS
    ids = [c.id for c in t.columns]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"table {t.name}: column ids must be unique, got {', '.join(ids)}")
    for c in t.columns:
        if c.not_available is None and c.benchmark not in list_datasets():
            raise ConfigError(f"table {t.name}: column '{c.id}' uses benchmark '{c.benchmark}', which the suite does not "
                              f"have; mark it not_available: REASON")
        bad = [m for m in c.metrics if m not in allowed]
        if bad:
            raise ConfigError(f"table {t.name}: column '{c.id}' has metric '{bad[0]}'; a {t.kind} table allows {', '.join(allowed)}")
        if c.split is not None and c.split not in SPLITS:
            raise ConfigError(f"table {t.name}: column '{c.id}' split must be one of {', '.join(SPLITS)}, got '{c.split}'")
        if c.checkpoint is not None and not (isinstance(c.checkpoint, dict) and c.checkpoint.get("file")):
            raise ConfigError(f"table {t.name}: column '{c.id}' checkpoint needs at least 'file'")
    registered = set(list_methods())
    folders: Dict[Path, Tuple[str, str]] = {}
    for r in t.rows:
        if bool(r.ours) == bool(r.not_implemented):
            raise ConfigError(f"table {t.name}: row '{r.label}' must name a registered method (ours) or say why it has "
                              f"none (not_implemented), not {'both' if r.ours else 'neither'}")
        if r.ours and r.ours not in registered:
            raise ConfigError(f"table {t.name}: row '{r.label}' names '{r.ours}', which is not registered; registered: "
                              f"{', '.join(sorted(registered))} (or mark the row not_implemented: REASON)")
        if r.preset and r.preset not in available_presets():
            raise ConfigError(f"table {t.name}: row '{r.label}' uses unknown preset '{r.preset}'; available: {', '.join(available_presets())}")
        unknown = sorted(set(r.set_for) - set(ids))
        if unknown:
            raise ConfigError(f"table {t.name}: row '{r.label}' set_for names unknown column '{unknown[0]}'")
        for c in t.columns:
            for m in c.metrics:
                reported(t, refs, r, c, m)
            if not r.ours or c.not_available:
                continue
            cfg = resolve_run(t, r, c, t.seeds[0], "data", "checkpoints")
            if t.kind == "runs":
                path = run_path(cfg, "runs", run_tag(r, c))
                h = config_hash(cfg.to_dict())
                if path in folders and folders[path][1] != h:
                    raise ConfigError(f"table {t.name}: rows '{folders[path][0]}' and '{r.label}' would share the run folder "
                                      f"{path} with different configs; give one a distinct tag")
                folders[path] = (r.label, h)


# --- planning ------------------------------------------------------------------------------

@dataclass
class FileNeed:
    """A file or folder a run reads: what it is, where, whether it is there, how to get it."""

    what: str
    path: str
    present: bool
    how: str = ""
    auto: bool = False  # fetched or made by the run itself when missing (download, micro-ViT pretraining)


@dataclass
class Estimate:
    """Cost-model estimate of one run: images processed, MACs per image, GPU hours."""

    train_images: float
    eval_images: float
    train_gmacs: float  # per training image, forward + backward of the costliest phase, every pass
    inference_gmacs: float
    gpu_hours: float


@dataclass
class PlannedRun:
    row: Row
    column: Column
    seed: int
    cfg: RunConfig
    tag: Optional[str]
    path: Path
    status: str = "missing"  # done | other-config | partial | failed | running | missing
    files: List[FileNeed] = field(default_factory=list)
    estimate: Optional[Estimate] = None
    also: List[str] = field(default_factory=list)  # other rows of the table that read the same run


def run_status(cfg: RunConfig, path: Path) -> str:
    """``done`` (result.json with this config's hash), ``other-config`` (a result of another config),
    ``partial`` (a checkpoint to resume), ``failed`` / ``running`` (status.json), else ``missing``."""
    from benchmarks.run.store import RunStore, config_hash

    store = RunStore(path)
    if store.is_done():
        try:
            same = store.read_result().get("config_hash") == config_hash(cfg.to_dict())
        except (OSError, ValueError):
            return "other-config"
        return "done" if same else "other-config"
    st = (store.status() or {}).get("status")
    if store.checkpoint_path.exists():
        return "partial"
    return st if st in ("failed", "running") else "missing"


def data_needs(cfg: RunConfig) -> List[FileNeed]:
    """The data files the run's benchmark reads (layouts of benchmarks/data/datasets.py), present or not."""
    from benchmarks.data import datasets as D

    b = cfg.benchmark
    root = Path(b.data_root)
    if b.name == "synthetic":
        return []
    if b.name == "cifar100":
        folder = root / "cifar-100-python"
        ok = all((folder / n).is_file() for n in ("train", "test", "meta"))
        return [FileNeed("CIFAR-100 (python version)", f"{folder}/{{train,test,meta}}", ok,
                         "downloaded by torchvision on the first run when online", auto=not D.offline())]
    if b.name == "fashion_mnist":
        return [FileNeed("Fashion-MNIST", str(root / "FashionMNIST" / "raw"), D.find_fashion_mnist(root) is not None,
                         f"apt-get install dataset-fashion-mnist, or {D.FASHION_MNIST_URL}")]
    if b.name == "imagenet_r":
        folder = root / "imagenet-r"
        n = sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0
        out = [FileNeed("ImageNet-R (200 class folders)", str(folder), n == D.IMAGENET_R_CLASSES, D.IMAGENET_R_URL)]
        if b.split == "file":
            for f in D.coda_split_files(b):
                out.append(FileNeed("CODA-Prompt ImageNet-R split file", str(f), f.is_file(), D.CODA_SPLIT_URL))
        return out
    if b.name == "cub200":
        folder = root / "CUB_200_2011"
        ok = all((folder / n).is_file() for n in D.CUB_FILES) and (folder / "images").is_dir()
        return [FileNeed("CUB-200-2011", f"{folder}/{{{','.join(D.CUB_FILES)},images/}}", ok, D.CUB_URL)]
    return [FileNeed(f"data of benchmark {b.name}", str(root), root.exists(), "see docs/data.md")]


def checkpoint_needs(cfg: RunConfig, url: Optional[str] = None) -> List[FileNeed]:
    """The backbone weights the run loads: a local file, the timm hub file, or the suite's micro ViT."""
    from methods import backbones as B

    bb = cfg.backbone
    source = B.resolve_source(bb)
    arch, _ = B.split_name(bb.name)
    if source == "none":
        return []
    if source == "file":
        return [FileNeed(f"backbone checkpoint ({bb.checkpoint_format})", str(bb.checkpoint),
                         bool(bb.checkpoint) and Path(bb.checkpoint).is_file(), url or "a local file (--checkpoint-dir)")]
    if source == "synthetic":
        from methods.pretrain import VERSION, cache_dir

        path = cache_dir() / f"{arch}-synthetic-v{VERSION}.safetensors"
        return [FileNeed("suite-pretrained micro ViT", str(path), path.exists(), "pretrained by the suite on the first run",
                         auto=True)]
    hub_id, filename = B._hub_file(bb.name)
    cached = B._cached_hub_file(bb.name)
    where = cached or (f"hf-hub:{hub_id}/{filename}" if hub_id else f"timm weights of {bb.name}")
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
    return [FileNeed(f"timm weights {bb.name}", where, cached is not None, "downloaded by timm on the first run when online",
                     auto=not hub_offline)]


def plan(t: TableDef, runs: str, data_root: str = "data", checkpoint_dir: str = "checkpoints",
         seeds: Optional[Sequence[int]] = None, extra: Sequence[str] = ()) -> List[PlannedRun]:
    """Every run of the table once (rows that read the same run folder and config share it)."""
    with cached_presets():
        return _plan(t, runs, data_root, checkpoint_dir, seeds, extra)


def _plan(t: TableDef, runs: str, data_root: str, checkpoint_dir: str, seeds: Optional[Sequence[int]],
          extra: Sequence[str]) -> List[PlannedRun]:
    from benchmarks.run.runner import run_path
    from benchmarks.run.store import config_hash

    out: List[PlannedRun] = []
    by_path: Dict[Path, PlannedRun] = {}
    for r in t.rows:
        if not r.ours:
            continue
        for c in t.columns:
            if c.not_available:
                continue
            for s in (list(seeds) if seeds else t.seeds):
                cfg = resolve_run(t, r, c, s, data_root, checkpoint_dir, extra)
                tag = run_tag(r, c)
                path = run_path(cfg, runs, tag)
                if path in by_path:
                    prev = by_path[path]
                    if config_hash(prev.cfg.to_dict()) != config_hash(cfg.to_dict()):
                        raise ConfigError(f"rows '{prev.row.label}' and '{r.label}' would share the run folder {path} with "
                                          f"different configs; give one a distinct tag")
                    if r.label not in prev.also and r.label != prev.row.label:
                        prev.also.append(r.label)
                    continue
                p = PlannedRun(r, c, s, cfg, tag, path)
                p.status = run_status(cfg, path)
                p.files = data_needs(cfg) + checkpoint_needs(cfg, (c.checkpoint or {}).get("url"))
                by_path[path] = p
                out.append(p)
    return out


# --- cost model ----------------------------------------------------------------------------

class CostModel:
    """MACs per image (benchmarks.cost.engine) of a run's method, counted once per distinct method config
    on a random backbone of the run's architecture, and the images a run processes."""

    def __init__(self) -> None:
        from benchmarks.tables.cost_table import BackboneCache

        self.cache = BackboneCache()
        self._macs: Dict[str, Tuple[float, float]] = {}

    def _setup(self, cfg: RunConfig):
        from benchmarks.tables.cost_table import MethodSetup, benchmark_classes

        return MethodSetup(cfg.method_name, cfg.benchmark.name, cfg, cfg.preset, benchmark_classes(cfg),
                           cfg.benchmark.num_tasks, cfg.backbone.name, cfg.preset)

    def row(self, cfg: RunConfig) -> Dict[str, Any]:
        """The cost.csv row of ``cfg``'s method (parameters, exact and paper-convention FLOPs)."""
        from benchmarks.tables.cost_table import cost_row
        from benchmarks.cost.flops import single_thread

        with single_thread():
            r, _, _ = cost_row(self._setup(cfg), self.cache)
        return r

    def macs(self, cfg: RunConfig) -> Tuple[float, float]:
        """(train GMACs, inference GMACs) per image."""
        from methods.backbones import split_name

        from benchmarks.tables.cost_table import benchmark_classes

        # float settings (loss weights, lr multipliers, noise levels, temperatures) change no
        # shape and no MAC count, so configs that differ only in them share one count
        shape = {k: v for k, v in (cfg.to_dict()["method"] or {}).items() if not isinstance(v, float)}
        key = json.dumps([cfg.method_name, shape, split_name(cfg.backbone.name)[0], benchmark_classes(cfg),
                          cfg.benchmark.num_tasks], sort_keys=True, default=str)
        if key not in self._macs:
            r = self.row(cfg)
            self._macs[key] = (float(r["train_gmacs"] or 0.0), float(r["inference_gmacs"]))
        return self._macs[key]

    def images(self, cfg: RunConfig) -> Tuple[float, float]:
        """(training images × epochs over every phase, evaluation images) of a full run."""
        from benchmarks.tables.cost_table import DATASET_IMAGES_PER_CLASS, build_method, make_tasks
        from benchmarks.cost.flops import single_thread
        from benchmarks.run.throughput import run_images

        s = self._setup(cfg)
        per_class = DATASET_IMAGES_PER_CLASS.get(s.benchmark, (100, 50))
        tr = cfg.benchmark.train_per_class or per_class[0]
        te = cfg.benchmark.test_per_class or per_class[1]
        per_task = s.num_classes // s.num_tasks
        with single_thread():  # small ops: threads only contend (and crawl on a busy CPU)
            backbone, _, _ = self.cache.get(s.backbone)
            method = build_method(s.name, cfg, backbone, s.num_classes, s.num_tasks)
            n = run_images(method, make_tasks(s.num_classes, s.num_tasks), cfg.train, [tr * per_task] * s.num_tasks,
                           [te * per_task] * s.num_tasks)
        return n["train_images"], n["eval_images"]


def estimate_run(cfg: RunConfig, model: CostModel, gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> Estimate:
    """GPU hours of one run = (training images × train MACs + evaluation images × inference MACs)
    × 2 FLOPs per MAC / the assumed sustained throughput. Training images count every epoch of
    every phase; train MACs are the costliest phase's forward and backward with every pass (the
    query cache, end-of-task statistics passes, classifier alignment on sampled features, data
    loading and start-up are not counted)."""
    train_gmacs, inf_gmacs = model.macs(cfg)
    train_images, eval_images = model.images(cfg)
    flops = 2e9 * (train_images * train_gmacs + eval_images * inf_gmacs)
    return Estimate(train_images, eval_images, train_gmacs, inf_gmacs, flops / (gpu_tflops * 1e12) / 3600)


# --- rendering -----------------------------------------------------------------------------

def _fmt(v: Optional[float], digits: int = 2) -> str:
    from reports import stats as S

    return S.fmt_num(v, digits)


def _ours(planned: List[PlannedRun], row: Row, col: Column, metric: str) -> Tuple[List[float], int]:
    """Our per-seed values of ``metric`` for (row, column) from the finished runs, and how many runs there are."""
    from benchmarks.run.store import RunStore

    runs = [p for p in planned if (p.row is row or row.label in p.also) and p.column is col]
    vals = []
    for p in runs:
        if p.status != "done":
            continue
        v = (RunStore(p.path).read_result().get("metrics") or {}).get(metric)
        if v is not None and math.isfinite(float(v)):
            vals.append(float(v))
    return vals, len(runs)


def accuracy_table(t: TableDef, planned: List[PlannedRun], refs: list, digits: int = 2):
    """Paper vs ours vs Δ, one line per (row, column, metric), every row kept."""
    import pandas as pd

    from reports import stats as S
    from reports.references import REFERENCE_METRICS
    from reports.tables import Cell, Table

    cols = ["method", "benchmark", "tasks", "checkpoint", "metric", "paper", "ours", "n", "Δ (ours − paper)", "status",
            "source [tag]"]
    records, rows = [], []
    for r in t.rows:
        for c in t.columns:
            for m in c.metrics:
                rep = reported(t, refs, r, c, m)
                if r.not_implemented:
                    mean, std, n, total, status = math.nan, math.nan, 0, 0, f"not implemented: {r.not_implemented}"
                elif c.not_available:
                    mean, std, n, total, status = math.nan, math.nan, 0, 0, f"not available: {c.not_available}"
                else:
                    vals, total = _ours(planned, r, c, m)
                    mean, std, n = S.mean_std(vals)
                    status = f"{n}/{total} runs" + (f"; {r.note}" if r.note else "")
                delta = mean - rep.value if rep is not None and math.isfinite(mean) else math.nan
                records.append({"method": r.label, "ours": r.ours, "benchmark": c.benchmark, "num_tasks": c.num_tasks,
                                "checkpoint": c.checkpoint_text, "metric": m,
                                "paper_value": rep.value if rep else math.nan,
                                "paper_std": rep.std if rep and rep.std is not None else math.nan,
                                "ours_mean": mean, "ours_std": std, "n_seeds": n, "runs": total, "delta": delta,
                                "implemented": not r.not_implemented, "status": status,
                                "tag": rep.tag if rep else None, "source": rep.source if rep else None,
                                "reference_file": rep.origin if rep else None})
                ours_txt = "not implemented" if r.not_implemented else ("n/a" if c.not_available else S.fmt_mean_std(mean, std, digits))
                rows.append([Cell(r.label), Cell(c.label), Cell(str(c.num_tasks)), Cell(c.checkpoint_text),
                             Cell(REFERENCE_METRICS.get(m, m)),
                             Cell(S.fmt_mean_std(rep.value, rep.std if rep.std is not None else math.nan, digits) if rep else "not reported"),
                             Cell(ours_txt), Cell(str(n) if n else "—"), Cell(_signed(delta, digits)), Cell(status),
                             Cell(f"{rep.source} [{rep.tag}]" if rep else "—")])
    notes = [f"{t.paper}, {t.table}. {t.description}".strip(),
             f"ours: mean ± sample std (ddof={S.STD_DDOF}) over the finished seeds of {', '.join(map(str, t.seeds))}; "
             "the papers' ± follow their own convention (CODA / SMoPE code: ddof=0).",
             "[V]: checked against a public copy of the source; [R]: recalled, unverified. Rows the suite does not "
             "implement keep the paper's number."]
    return Table(t.name, f"Reproduction of {t.paper}: {t.table}", cols, rows, pd.DataFrame(records), notes + t.notes)


def _signed(v: float, digits: int) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{0.0 if round(v, digits) == 0 else v:+.{digits}f}"


def efficiency_records(t: TableDef, model: Optional[CostModel] = None, only: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """One record per (row, column) of a cost table: the paper's numbers and ours, counted offline
    (random weights of the column's architecture). ``only``: row labels to count (tests)."""
    with cached_presets():
        return _efficiency_records(t, model or CostModel(), only)


def _efficiency_records(t: TableDef, model: CostModel, only: Optional[Sequence[str]]) -> List[Dict[str, Any]]:
    refs = load_refs(t)
    out = []
    for c in t.columns:
        for r in t.rows:
            rec: Dict[str, Any] = {"method": r.label, "ours": r.ours, "benchmark": c.benchmark, "num_tasks": c.num_tasks,
                                   "backbone": c.backbone, "implemented": not r.not_implemented}
            for m in COST_METRICS:
                rep = reported(t, refs, r, c, m) if m in c.metrics else None
                rec[f"paper_{m}"] = rep.value if rep else math.nan
                rec[f"source_{m}"] = f"{rep.source} [{rep.tag}]" if rep else None
            if r.ours and (only is None or r.label in only):
                cfg = resolve_run(t, r, c, 0, "data", "checkpoints")
                row = model.row(cfg)
                rec.update({
                    "added_params": row["added_params"], "added_params_m": row["added_params"] / 1e6,
                    "inference_passes": row["inference_passes"], "train_passes": row["train_passes"],
                    "train_gflops_paper": row["paper_convention_gflops_train"],
                    "inference_gflops_paper": row["paper_convention_gflops_inference"],
                    "train_fwd_gflops_exact": 2 * row["train_fwd_gmacs"], "train_gflops_exact": row["train_gflops"],
                    "inference_gflops_exact": row["inference_gflops"], "preset": r.preset or "paper",
                })
            out.append(rec)
    return out


def efficiency_table(t: TableDef, records: List[Dict[str, Any]]):
    """Wide table: paper vs ours (paper convention, and exact) for params and train / test GFLOPs."""
    import pandas as pd

    from reports.tables import Cell, Table

    cols = ["method", "added params: paper (M)", "ours (#)", "Δ (M)",
            "train GFLOPs: paper", "ours, paper conv.", "Δ", "ours, exact fwd", "ours, exact fwd+bwd",
            "test GFLOPs: paper", "ours, paper conv.", "Δ", "ours, exact", "passes test / train"]
    rows = []
    for rec in records:
        if not rec["implemented"] or "added_params" not in rec:
            why = "not implemented" if not rec["implemented"] else "not counted"
            rows.append([Cell(rec["method"]), Cell(_fmt(rec["paper_added_params_m"])), Cell(why), Cell("—"),
                         Cell(_fmt(rec["paper_train_gflops_paper"])), Cell(why), Cell("—"), Cell("—"), Cell("—"),
                         Cell(_fmt(rec["paper_inference_gflops_paper"])), Cell(why), Cell("—"), Cell("—"), Cell("—")])
            continue
        rows.append([
            Cell(rec["method"]), Cell(_fmt(rec["paper_added_params_m"])), Cell(f"{int(rec['added_params']):,}"),
            Cell(_signed(rec["added_params_m"] - rec["paper_added_params_m"], 2)),
            Cell(_fmt(rec["paper_train_gflops_paper"])), Cell(_fmt(rec["train_gflops_paper"])),
            Cell(_signed(rec["train_gflops_paper"] - rec["paper_train_gflops_paper"], 2)),
            Cell(_fmt(rec["train_fwd_gflops_exact"])), Cell(_fmt(rec["train_gflops_exact"])),
            Cell(_fmt(rec["paper_inference_gflops_paper"])), Cell(_fmt(rec["inference_gflops_paper"])),
            Cell(_signed(rec["inference_gflops_paper"] - rec["paper_inference_gflops_paper"], 2)),
            Cell(_fmt(rec["inference_gflops_exact"])), Cell(f"{rec['inference_passes']} / {rec['train_passes']}"),
        ])
    backbone = t.columns[0].backbone if t.columns else "?"
    notes = [f"{t.paper}, {t.table}. {t.description}".strip(),
             f"ours: counted offline on {backbone} with random weights (counts do not depend on weight values), "
             "the method built from its preset for a 200-class, 10-task ImageNet-R run, in its last task.",
             "added params: every parameter the method owns (prompts, keys, attention vectors, heads, auxiliary networks); "
             "Δ in millions.",
             "paper conv.: module-hook operations (Linear / Conv MACs + bias adds, LayerNorm and GELU one per element, "
             "attention products not counted) × 2, with the poster's count of query passes in training "
             "(benchmarks/cost/flops.py, docs/cost.md). exact: fvcore MACs × 2 of every pass, attention products (prefix "
             "columns included) counted; fwd+bwd adds the backward of the costliest training phase.",
             "Rows without a registered method keep the poster's numbers."]
    return Table(t.name, f"Reproduction of {t.paper}: {t.table}", cols, rows, pd.DataFrame(records), notes + t.notes)


def write(table, out: Path) -> Dict[str, Path]:
    from reports.render import write_table

    return write_table(table, Path(out))


# --- command -------------------------------------------------------------------------------

def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def dry_run_text(t: TableDef, planned: List[PlannedRun], estimates: bool, gpu_tflops: float) -> str:
    """The listing of ``--dry-run``: every run, its status, files, estimate; then the totals."""
    lines = [f"table {t.name}: {t.paper}, {t.table}"]
    if t.description:
        lines.append(f"  {t.description}")
    for r in t.rows:
        if r.not_implemented:
            lines.append(f"  row '{r.label}': not implemented ({r.not_implemented}); the paper's number is shown")
    for c in t.columns:
        if c.not_available:
            lines.append(f"  column '{c.label}': not available ({c.not_available}); the paper's numbers are shown")
    lines.append(f"runs ({len(planned)}: benchmark × method × seed × preset × checkpoint), grouped by setting:")
    model = CostModel() if estimates else None
    total_h = missing_h = 0.0
    groups: Dict[Tuple[str, str], List[PlannedRun]] = {}
    for p in planned:
        groups.setdefault((p.row.label, p.column.id), []).append(p)
    for group in groups.values():
        p0 = group[0]
        b = p0.cfg.benchmark
        also = f" (also row {', '.join(repr(a) for a in p0.also)})" if p0.also else ""
        lines.append(f"- {b.name} T={b.num_tasks} | {p0.row.label}{also} = {p0.cfg.method_name}"
                     f"{'@' + p0.tag if p0.tag else ''} | preset {p0.cfg.preset} | {p0.column.checkpoint_text} ({p0.cfg.backbone.name})")
        for f in p0.files:
            lines.append(f"    {'present' if f.present else 'MISSING':<8} {f.what}: {f.path}" + ("" if f.present else f"  ({f.how})"))
        if model is not None:
            e = estimate_run(p0.cfg, model, gpu_tflops)  # seeds differ in class order only: same cost
            lines.append(f"    estimate {_hours(e.gpu_hours)} per run: {e.train_images:,.0f} train images × {e.train_gmacs:.1f} "
                         f"GMACs + {e.eval_images:,.0f} eval images × {e.inference_gmacs:.1f} GMACs")
            for p in group:
                p.estimate = e
                total_h += e.gpu_hours
                missing_h += e.gpu_hours if p.status != "done" else 0.0
        for p in group:
            lines.append(f"    seed {p.seed:<4} {p.status:<12} {p.path}")
    done = sum(p.status == "done" for p in planned)
    missing_files = sorted({f.path for p in planned if p.status != "done" for f in p.files if not f.present})
    lines.append(f"{done} of {len(planned)} runs done, {len(planned) - done} to run.")
    if missing_files:
        lines.append(f"missing files ({len(missing_files)}): " + "; ".join(missing_files))
    if model is not None:
        lines.append(f"estimated GPU time: {_hours(missing_h)} for the runs to do ({_hours(total_h)} for all), assuming "
                     f"{gpu_tflops:g} TFLOP/s sustained (--gpu-tflops) and 2 FLOPs per MAC of the cost model: training "
                     f"images × epochs × the costliest phase's forward+backward MACs (every pass) + evaluation images × "
                     f"inference MACs; data loading, start-up, the query cache, statistics passes and classifier "
                     f"alignment are not counted.")
    return "\n".join(lines)


def _sweep_args(args: argparse.Namespace) -> argparse.Namespace:
    """The launcher options of ``bench.py sweep`` from the reproduce command line."""
    def get(name: str, default: Any) -> Any:
        return getattr(args, name, default) if getattr(args, name, None) is not None else default

    return argparse.Namespace(out=args.runs, overwrite=False, launcher=get("launcher", "local"), gpus=get("gpus", None),
                              partition=get("partition", None), time_limit=get("time_limit", 240),
                              cpus_per_task=get("cpus_per_task", 8), array_parallelism=get("array_parallelism", 64),
                              submitit_backend=get("submitit_backend", "slurm"), no_wait=bool(get("no_wait", False)),
                              device=get("device", None))


def launch(planned: List[PlannedRun], args: argparse.Namespace) -> int:
    """Run every planned run not done, through the sweep's planner and launchers. Returns the
    sweep's exit status (0: all done, 1: a run failed, 128 + signal: interrupted)."""
    from benchmarks.run import sweep

    todo = [p for p in planned if p.status != "done"]
    blocked = sorted({f"{f.what}: {f.path} ({f.how})" for p in todo for f in p.files
                      if not f.present and not f.auto})
    if blocked:
        raise ConfigError(f"{len(blocked)} file(s) the runs need are missing, first {blocked[0]}; see --dry-run "
                          f"(or --report-only to render the finished runs)")
    if getattr(args, "device", None):
        for p in todo:
            p.cfg.device = args.device
    entries = [sweep.Entry(p.cfg, p.tag, p.path) for p in todo]
    if not entries:
        return 0
    sweep.plan(entries, overwrite=False)
    sargs = _sweep_args(args)
    pending = [e for e in entries if e.action != "skip"]
    print(f"reproduce: {len(planned)} runs, {len(pending)} to run ({sargs.launcher})", flush=True)
    if not pending:
        signum = None
    elif sargs.launcher == "slurm":
        signum = sweep.launch_slurm(pending, sargs)
    elif sargs.gpus:
        signum = sweep.launch_processes(pending, sargs)
    else:
        signum = sweep.launch_local(pending, sargs)
    print(sweep.summary(entries), flush=True)
    if signum:
        return 128 + signum
    return 1 if any(e.status == "failed" for e in entries) else 0


def cli(args: argparse.Namespace) -> int:
    """``bench.py reproduce TABLE [--dry-run | --report-only]``; exit 2 for an unknown table or bad input."""
    from reports.render import to_markdown

    t0 = time.time()
    if not getattr(args, "table", None):
        raise ConfigError(f"name a table to reproduce; available tables: {', '.join(list_tables())}")
    t = load_table(args.table)
    refs = load_refs(t)
    validate_table(t, refs)
    gpu_tflops = float(getattr(args, "gpu_tflops", None) or DEFAULT_GPU_TFLOPS)
    if gpu_tflops <= 0:
        raise ConfigError("--gpu-tflops must be positive")
    out = Path(getattr(args, "out", None) or "results/reproduce")
    if t.kind == "cost":
        if args.dry_run:
            rows = [r for r in t.rows if r.ours]
            print(f"table {t.name}: cost only, no runs and no files needed; counts {len(rows)} methods "
                  f"({', '.join(r.label for r in rows)}) on {', '.join(c.backbone or '?' for c in t.columns)} with random "
                  f"weights on this CPU; rows not implemented: {', '.join(r.label for r in t.rows if not r.ours) or 'none'}")
            return 0
        table = efficiency_table(t, efficiency_records(t))
        paths = write(table, out)
        print(to_markdown(table))
        print(f"{t.name} written to {paths['md']}, {paths['tex']}, {paths['csv']} in {time.time() - t0:.1f}s", file=sys.stderr)
        return 0
    seeds = getattr(args, "seeds", None)
    planned = plan(t, args.runs, getattr(args, "data_root", None) or "data", getattr(args, "checkpoint_dir", None) or "checkpoints",
                   seeds, getattr(args, "set", None) or [])
    if args.dry_run:
        print(dry_run_text(t, planned, not getattr(args, "no_estimate", False), gpu_tflops))
        return 0
    code = 0
    if not getattr(args, "report_only", False):
        code = launch(planned, args)
        for p in planned:
            p.status = run_status(p.cfg, p.path)
    table = accuracy_table(t, planned, refs)
    paths = write(table, out)
    print(to_markdown(table))
    print(f"{t.name} written to {paths['md']}, {paths['tex']}, {paths['csv']}", file=sys.stderr)
    return code

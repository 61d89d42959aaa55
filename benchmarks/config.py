"""Typed run configuration: dataclasses, preset resolution and ``--set key=value`` overrides.

Resolution order (later wins): dataclass defaults -> the benchmark's defaults for the preset
(``presets/_benchmarks.yaml``) -> the method's preset (``presets/<method>.yaml``) -> CLI flags
(``--backbone``, ``--device`` ...) -> ``--set`` overrides. The resolved config is dumped into the
run directory, so a result always says exactly how it was produced.

Every key is checked against the dataclass fields and every value against the field's type: a
typo or a wrong type is a :class:`ConfigError` (one sentence, exit status 2 from the CLI), never a
silently ignored setting.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one clear sentence."""


@dataclass
class BenchmarkConfig:
    """Which data, how it is split into tasks, and how images are transformed."""

    name: str = "synthetic"
    num_tasks: int = 5
    num_classes: Optional[int] = None  # None: every class of the dataset
    data_root: str = "data"
    class_order: str = "seeded"  # seeded: permutation from the run seed | natural
    image_size: Optional[int] = None  # None: the backbone's input size
    train_transform: str = "default"  # default | none | rrc_flip | crop_flip | hide_cifar
    test_transform: str = "default"  # default | resize | resize_crop
    normalize: str = "none"  # none ([0,1] inputs, the reference codes) | half (0.5/0.5) | imagenet | cifar
    rrc_scale_min: float = 0.08  # RandomResizedCrop lower scale (L2P/DualPrompt ports use 0.05)
    split: str = "default"  # ImageNet-R: random (DualPrompt/HiDe 80/20) | file (CODA split YAML)
    split_file: Optional[str] = None
    split_seed: int = 42
    val_fraction: float = 0.0  # carve a validation split from train (0: none)
    train_per_class: Optional[int] = None  # synthetic: samples per class
    test_per_class: Optional[int] = None
    # Training images per class held out of the CL stream (drawn first, seeded by split_seed):
    # the pool that backbone.pretrain=in_domain pretrains on; never seen by any task (0: none).
    pretrain_holdout: int = 0


@dataclass
class BackboneConfig:
    """The shared ViT: timm name (with tag), weights source and optional local checkpoint."""

    name: str = "vit_micro_patch8_32"
    pretrained: str = "auto"  # auto | none | timm | file | synthetic
    checkpoint: Optional[str] = None
    checkpoint_format: str = "auto"  # auto | timm | npz | ibot | dino | mocov3
    drop_path: float = 0.0
    # What the suite pretrains a micro ViT on (pretrained: synthetic / auto): procedural classes
    # disjoint from every task, or in_domain: the benchmark's benchmark.pretrain_holdout images
    # (methods/pretrain.py, docs/data.md §6).
    pretrain: str = "procedural"  # procedural | in_domain


@dataclass
class TrainConfig:
    """Optimiser, schedule, epochs and logit masking of the per-task training loop."""

    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 128
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    lr_scale_batch: Optional[int] = None  # lr *= batch_size / lr_scale_batch (JH-LEE, HiDe: 256)
    betas: Tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | cosine_epoch | coda_cosine | coswm | step | timm_cosine
    warmup_epochs: int = 0
    freeze_iters: int = 0  # coswm: iterations at the floor lr before the cosine
    iter_step: Optional[int] = None  # coswm: iterations per epoch assumed by the schedule
    schedule_epochs: Optional[int] = None  # coda_cosine: K when the phase is the start of a longer schedule (OVOR)
    min_lr: float = 0.0
    milestones: List[int] = field(default_factory=list)  # step schedule (epochs)
    gamma: float = 0.1
    clip_grad: Optional[float] = None
    train_mask: str = "current"  # current (past+future logits -inf) | seen (future only) | none
    eval_mask: str = "seen"  # seen (argmax over seen classes) | none
    drop_last: bool = False
    num_workers: int = 0
    checkpoint_every_epochs: int = 0  # 0: checkpoint after each task only


@dataclass
class RunConfig:
    """Everything one run needs. ``method`` is the method's own typed config dataclass."""

    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_name: str = "linear_probe"
    method: Any = None
    preset: str = "quick"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # fp32 (default: every reference code runs fp32) | bf16 (autocast; explicit opt-in, measured
    # effect in docs/speed.md) | auto (bf16 on CUDA, fp32 on CPU; also an opt-in)
    precision: str = "fp32"
    compile: bool = False
    query_cache: bool = True
    quiet: bool = False
    tensorboard: bool = False  # also write TensorBoard event files (benchmarks/run/runlog.py)

    def to_dict(self) -> Dict[str, Any]:
        return to_plain(self)


# --- generic dataclass helpers -------------------------------------------------------------

def to_plain(obj: Any) -> Any:
    """Dataclasses / tuples -> plain dicts and lists, for YAML and JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int->float and lists->tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key} expects {_type_name(tp)}, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        return [coerce(v, args[0] if args else Any, key) for v in value]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{key} expects a tuple of {len(args)} values, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping, got {value!r}")
        obj = tp()
        apply_mapping(obj, value, key)
        return obj
    return value


def apply_mapping(obj: Any, mapping: Dict[str, Any], prefix: str) -> None:
    """Set the fields of dataclass ``obj`` from a nested mapping, checking keys and types."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in (mapping or {}).items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown setting '{full}'; valid keys under '{prefix or 'top level'}' are: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            apply_mapping(current, value, full)
        else:
            setattr(obj, key, coerce(value, hints[key], full))


def _python_number(raw: str, value: Any) -> Any:
    """``1e-3``, ``3e-4``, ``1.0e6``: YAML 1.1 reads these as strings; read them as Python does."""
    if not isinstance(value, str):
        return value
    text = raw.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return value


def parse_set(items: List[str]) -> Dict[str, Any]:
    """``["train.lr=0.01", "method.pool_size=20"]`` -> nested dict, values parsed as YAML
    (numbers as Python reads them, so ``train.lr=1e-3`` is a number)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        value = _python_number(raw, value)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --- presets -------------------------------------------------------------------------------

_YAML_CACHE: Dict[Path, Tuple[Tuple[int, int], Dict[str, Any]]] = {}


def load_yaml(path: Path) -> Dict[str, Any]:
    """A preset file's mapping (a fresh copy). Parsed once per file version: resolving every
    method × preset × benchmark reads the same few files hundreds of times."""
    path = Path(path)
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _YAML_CACHE.get(path)
    if hit is None or hit[0] != stamp:
        with open(path) as f:
            hit = (stamp, yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {})
        _YAML_CACHE[path] = hit
    return copy.deepcopy(hit[1])


def benchmark_presets() -> Dict[str, Any]:
    """``presets/_benchmarks.yaml``: per preset, per benchmark, the shared defaults."""
    return load_yaml(PRESET_DIR / "_benchmarks.yaml")


def method_preset_file(method: str) -> Path:
    return PRESET_DIR / f"{method}.yaml"


def available_presets() -> List[str]:
    return sorted(benchmark_presets().keys())


def preset_layers(preset: str, benchmark: str, method: str, num_tasks: Optional[int] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """The preset mappings that apply to (preset, benchmark, method), in resolution order.

    Benchmark file: ``{preset: {benchmark: {...}, '*': {...}}}``; method file:
    ``{presets: {preset: {'*': {...}, benchmark: {...}}}}``. ``'*'`` applies to every benchmark;
    a key ``benchmark@T`` (e.g. ``imagenet_r@5``) applies on top of ``benchmark`` when the run
    has T tasks (the 5/10/20-task settings of one benchmark differ in hyper-parameters).
    Order: benchmark file ``*``, ``b``, ``b@T``, then method file ``*``, ``b``, ``b@T``.
    """
    bench = benchmark_presets()
    if preset not in bench:
        raise ConfigError(f"unknown preset '{preset}'; available presets: {', '.join(sorted(bench))}")
    keys = ["*", benchmark] + ([f"{benchmark}@{num_tasks}"] if num_tasks is not None else [])
    layers: List[Tuple[str, Dict[str, Any]]] = []
    bp = bench[preset] or {}
    layers += [(f"_benchmarks.yaml:{preset}:{k}", bp[k]) for k in keys if k in bp]
    mfile = method_preset_file(method)
    if mfile.exists():
        mp = (load_yaml(mfile).get("presets") or {}).get(preset) or {}
        layers += [(f"{mfile.name}:{preset}:{k}", mp[k]) for k in keys if k in mp]
    return layers


def _num_tasks(merged: Dict[str, Any]) -> int:
    value = (merged.get("benchmark") or {}).get("num_tasks", BenchmarkConfig.num_tasks)
    return value if isinstance(value, int) and not isinstance(value, bool) else BenchmarkConfig.num_tasks


# Settings that decide what a run is: each must come from a preset file (or the command line),
# never from a dataclass default (issue 21: `coda` on cub200 once ran 5 tasks and the `default`
# test transform without saying so). Training keys only matter when the preset trains.
REQUIRED_KEYS = ("backbone.name", "benchmark.num_tasks", "benchmark.class_order", "benchmark.normalize",
                 "benchmark.train_transform", "benchmark.test_transform", "train.epochs", "train.batch_size",
                 "precision")
TRAINING_KEYS = ("train.drop_last", "train.optimizer", "train.lr", "train.schedule")
OVERRIDE_SOURCE = "command line (--set / flags)"
DEFAULT_SOURCE = "dataclass default"


def flatten_keys(d: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted leaf keys of a nested mapping (lists are leaves)."""
    out: List[str] = []
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += flatten_keys(v, key) if isinstance(v, dict) else [key]
    return out


def _missing_explicit(cfg: "RunConfig", sources: Dict[str, str]) -> List[str]:
    keys = list(REQUIRED_KEYS)
    if cfg.train.epochs > 0:
        keys += TRAINING_KEYS
    if cfg.benchmark.train_transform == "rrc_flip":
        keys.append("benchmark.rrc_scale_min")
    return [k for k in keys if k not in sources]


def resolve_with_sources(
    method: str,
    benchmark: str,
    preset: str = "quick",
    overrides: Optional[Dict[str, Any]] = None,
    method_config_cls: Optional[type] = None,
    strict: bool = True,
) -> Tuple["RunConfig", Dict[str, str]]:
    """:func:`resolve_config` plus, per dotted key, where its value came from (a preset file
    layer such as ``l2p.yaml:paper:*``, the command line, or absent: the dataclass default).

    ``strict`` (the default): a setting of :data:`REQUIRED_KEYS` (and the training keys when the
    preset trains) that no preset layer or override sets is a :class:`ConfigError`, so a preset
    never falls back to a built-in default for a benchmark it has no entry for.
    """
    if method_config_cls is None:
        from methods.registry import get_method_class

        method_config_cls = get_method_class(method).Config

    def merge(layers: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for _, layer in layers:
            out = deep_merge(out, layer)
        return deep_merge(out, overrides or {})

    # first without the task-count layers, to learn T; then with the ``benchmark@T`` layers
    merged = merge(preset_layers(preset, benchmark, method))
    layers = preset_layers(preset, benchmark, method, _num_tasks(merged))
    merged = merge(layers)
    sources: Dict[str, str] = {}
    for name, layer in layers:
        for key in flatten_keys(layer):
            sources[key] = name
    for key in flatten_keys(overrides or {}):
        sources[key] = OVERRIDE_SOURCE
    cfg = RunConfig()
    cfg.preset = preset
    cfg.method_name = method
    cfg.benchmark.name = benchmark
    cfg.method = method_config_cls()
    method_part = merged.pop("method", {}) or {}
    if not isinstance(method_part, dict):
        raise ConfigError("the 'method' section must be a mapping of key: value")
    for k in ("method_name", "preset"):
        if k in merged:
            raise ConfigError(f"'{k}' cannot be set; it comes from the command line")
    apply_mapping(cfg, merged, "")
    apply_mapping(cfg.method, method_part, "method")
    cfg.benchmark.name = benchmark
    validate_values(cfg)
    validate = getattr(cfg.method, "validate", None)
    if callable(validate):
        validate()
    if strict:
        missing = _missing_explicit(cfg, sources)
        if missing:
            named = any(name.split(":")[-1].split("@")[0] == benchmark for name, _ in layers)
            where = f"benchmarks/presets/{method}.yaml or _benchmarks.yaml"
            if not named:
                raise ConfigError(
                    f"preset '{preset}' has no entry for benchmark '{benchmark}' (method '{method}': no '{benchmark}' "
                    f"key under '{preset}' in {where}), so {', '.join(missing)} would fall back to built-in defaults; "
                    f"add that entry or pass the settings with --set")
            raise ConfigError(
                f"preset '{preset}' leaves {', '.join(missing)} unset for method '{method}' on '{benchmark}', "
                f"which would fall back to built-in defaults; set them under '{preset}' in {where} or pass them with --set")
    return cfg, sources


def resolve_config(
    method: str,
    benchmark: str,
    preset: str = "quick",
    overrides: Optional[Dict[str, Any]] = None,
    method_config_cls: Optional[type] = None,
    strict: bool = True,
) -> RunConfig:
    """Build the :class:`RunConfig` for one (method, benchmark, preset) plus overrides
    (:func:`resolve_with_sources`; ``strict=False`` only where a partial config is enough, e.g.
    counting a method's parameters)."""
    return resolve_with_sources(method, benchmark, preset, overrides, method_config_cls, strict)[0]


# --- values that parse but mean nothing (checked before any file is written) --------------

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "cosine_epoch", "coda_cosine", "coswm", "step", "timm_cosine")
TRAIN_MASKS = ("current", "seen", "none")
EVAL_MASKS = ("seen", "none")
PRECISIONS = ("auto", "fp32", "bf16")
PRETRAINED = ("auto", "none", "timm", "file", "synthetic")
CHECKPOINT_FORMATS = ("auto", "timm", "npz", "ibot", "dino", "mocov3")


def validate_values(cfg: RunConfig) -> None:
    """Refuse values of the right type that mean nothing (``epochs=-1``, ``lr=-1``, ``batch_size=0``,
    an unknown optimizer ...); one sentence naming the key. ``train.epochs=0`` is checked against
    the method in ``runner.prepare`` (NCM trains nothing, so 0 is its preset)."""
    import math

    def at_least(key: str, value: Any, low: float, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value < low or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{key}={value} is out of range; it must be at least {low:g}")

    def one_of(key: str, value: Any, choices: Tuple[str, ...]) -> None:
        if value not in choices:
            raise ConfigError(f"unknown {key} '{value}'; use {', '.join(choices)}")

    b, t = cfg.benchmark, cfg.train
    at_least("benchmark.num_tasks", b.num_tasks, 1)
    at_least("benchmark.num_classes", b.num_classes, 1, allow_none=True)
    at_least("benchmark.train_per_class", b.train_per_class, 1, allow_none=True)
    at_least("benchmark.test_per_class", b.test_per_class, 1, allow_none=True)
    at_least("benchmark.image_size", b.image_size, 1, allow_none=True)
    if not 0.0 <= b.val_fraction < 1.0:
        raise ConfigError(f"benchmark.val_fraction={b.val_fraction} is out of range; it must lie in [0, 1)")
    if t.epochs < 0:
        raise ConfigError(f"train.epochs={t.epochs} is out of range; it must be at least 1 (0 only for a method that "
                          f"trains nothing, such as ncm)")
    at_least("train.batch_size", t.batch_size, 1)
    at_least("train.eval_batch_size", t.eval_batch_size, 1)
    at_least("train.lr", t.lr, 0)
    at_least("train.lr_scale_batch", t.lr_scale_batch, 1, allow_none=True)
    at_least("train.momentum", t.momentum, 0)
    at_least("train.weight_decay", t.weight_decay, 0)
    at_least("train.warmup_epochs", t.warmup_epochs, 0)
    at_least("train.freeze_iters", t.freeze_iters, 0)
    at_least("train.iter_step", t.iter_step, 1, allow_none=True)
    at_least("train.min_lr", t.min_lr, 0)
    at_least("train.gamma", t.gamma, 0)
    at_least("train.num_workers", t.num_workers, 0)
    at_least("train.checkpoint_every_epochs", t.checkpoint_every_epochs, 0)
    for m in t.milestones:
        at_least("train.milestones", m, 0)
    if t.clip_grad is not None and not t.clip_grad > 0:
        raise ConfigError(f"train.clip_grad={t.clip_grad} is out of range; it must be positive (or null for no clipping)")
    one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    one_of("train.schedule", t.schedule, SCHEDULES)
    one_of("train.train_mask", t.train_mask, TRAIN_MASKS)
    one_of("train.eval_mask", t.eval_mask, EVAL_MASKS)
    one_of("precision", cfg.precision, PRECISIONS)
    one_of("backbone.pretrained", cfg.backbone.pretrained, PRETRAINED)
    one_of("backbone.checkpoint_format", cfg.backbone.checkpoint_format, CHECKPOINT_FORMATS)
    if not 0.0 <= cfg.backbone.drop_path < 1.0:
        raise ConfigError(f"backbone.drop_path={cfg.backbone.drop_path} is out of range; it must lie in [0, 1)")


def run_config_from_dict(d: Dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its dumped dict (used by resume and reports)."""
    from methods.registry import get_method_class

    d = copy.deepcopy(d)
    cfg = RunConfig()
    cfg.method_name = d.pop("method_name")
    cfg.preset = d.pop("preset", "quick")
    cfg.method = get_method_class(cfg.method_name).Config()
    apply_mapping(cfg.method, d.pop("method", {}) or {}, "method")
    apply_mapping(cfg, d, "")
    validate_values(cfg)
    return cfg

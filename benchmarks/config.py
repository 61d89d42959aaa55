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
    schedule: str = "constant"  # constant | cosine | coda_cosine | coswm | step
    warmup_epochs: int = 0
    freeze_iters: int = 0  # coswm: iterations at the floor lr before the cosine
    iter_step: Optional[int] = None  # coswm: iterations per epoch assumed by the schedule
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
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    query_cache: bool = True
    quiet: bool = False
    tensorboard: bool = False  # also write TensorBoard event files (benchmarks/runlog.py)

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


def parse_set(items: List[str]) -> Dict[str, Any]:
    """``["train.lr=0.01", "method.pool_size=20"]`` -> nested dict, values parsed as YAML."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
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

def load_yaml(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


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


def resolve_config(
    method: str,
    benchmark: str,
    preset: str = "quick",
    overrides: Optional[Dict[str, Any]] = None,
    method_config_cls: Optional[type] = None,
) -> RunConfig:
    """Build the :class:`RunConfig` for one (method, benchmark, preset) plus overrides."""
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
    merged = merge(preset_layers(preset, benchmark, method, _num_tasks(merged)))
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
    validate = getattr(cfg.method, "validate", None)
    if callable(validate):
        validate()
    return cfg


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
    return cfg

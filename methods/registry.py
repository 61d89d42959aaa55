"""Method registry: ``@register_method("name")``, ``create_method``, ``list_methods``.

Methods (``methods/``) and baselines (``baselines/``) register themselves when their module is
imported. :func:`load_all` imports every module of both packages, so adding a method means adding
one file: no import list or if/elif chain to edit.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Type

if TYPE_CHECKING:  # pragma: no cover
    from methods.base import ContinualMethod

_REGISTRY: Dict[str, Type["ContinualMethod"]] = {}
_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("methods", "baselines")
_loaded = False


class UnknownMethodError(KeyError):
    """Raised for a method name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def register_method(name: str, *, baseline: bool = False) -> Callable[[type], type]:
    """Class decorator: register a :class:`ContinualMethod` subclass under ``name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name '{name}' is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        cls.is_baseline = baseline
        _REGISTRY[name] = cls
        return cls

    return deco


def load_all() -> None:
    """Import every module of ``methods/`` and ``baselines/`` so that they register."""
    global _loaded
    if _loaded:
        return
    for pkg in _PACKAGES:
        for info in pkgutil.iter_modules([str(_ROOT / pkg)]):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg}.{info.name}")
    _loaded = True


def list_methods(kind: Optional[str] = None) -> List[str]:
    """Registered names, sorted. ``kind``: None (all), "method" or "baseline"."""
    load_all()
    names = sorted(_REGISTRY)
    if kind == "method":
        return [n for n in names if not _REGISTRY[n].is_baseline]
    if kind == "baseline":
        return [n for n in names if _REGISTRY[n].is_baseline]
    return names


def get_method_class(name: str) -> Type["ContinualMethod"]:
    load_all()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method '{name}'; registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_method(name: str, backbone: Any, num_classes: int, cfg: Any = None, num_tasks: Optional[int] = None,
                  **kwargs: Any) -> "ContinualMethod":
    """Instantiate a registered method on ``backbone`` for ``num_classes`` classes.

    ``cfg`` is the method's ``Config`` dataclass (defaults when None). ``num_tasks`` (the
    scenario's task count) is passed on only to methods whose constructor takes a ``num_tasks``
    argument (e.g. CODA-Prompt, which splits its component pool into per-task slices up front).
    """
    cls = get_method_class(name)
    if num_tasks is not None and "num_tasks" in inspect.signature(cls.__init__).parameters:
        kwargs["num_tasks"] = num_tasks
    return cls(backbone, num_classes, cfg if cfg is not None else cls.Config(), **kwargs)

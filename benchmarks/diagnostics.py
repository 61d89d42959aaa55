"""Diagnostics that explain a ranking, stored in every result.json under ``diagnostics``.

* ``prompt_usage`` -- for methods with a pool or a selection (``selection_size`` set and
  ``MethodOutput.diagnostics["selection"]`` emitted): per test task j, how often each pool entry
  was selected in the evaluation after the last task, summed over the method's selection groups
  (layers, heads) and over top-k slots. A sample that picks k entries in each of L layers
  contributes L·k counts. The per-group histograms stay under ``diagnostics.selection_hist``.
* ``task_id_accuracy`` -- for methods that infer a task identity (``diagnostics["task_pred"]``:
  DualPrompt / L2P-style key matching, HiDe-Prompt's TII head, ...): per test task j, the percentage
  of its test samples whose inferred task was j, after the last task (``final``) and right after
  task j was learned (``diagonal``), and the mean of the final row.
* ``method_traits`` -- what kind of method a row is, for the report's main table:
  ``first_task_only`` (trains in task 1 and never again), ``trains_backbone`` (the ViT's own
  weights receive updates), ``class_statistics`` (keeps per-class prototypes, Gaussians or sums).

Both usage and accuracy are ``None`` for methods that do not emit the underlying signal.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np


def prompt_usage(selection: Dict[str, Any], selection_size: Optional[int]) -> Optional[Dict[str, Any]]:
    """``{"selection_size": S, "per_task": {"j": [S counts]}}`` from the runner's
    ``selection["final"]`` histograms ({j: nested lists whose last axis has S entries})."""
    final = (selection or {}).get("final") or {}
    if not final or not selection_size:
        return None
    per_task = {}
    for j, hist in sorted(final.items(), key=lambda kv: int(kv[0])):
        a = np.asarray(hist, dtype=np.int64).reshape(-1, selection_size)
        per_task[str(j)] = [int(v) for v in a.sum(axis=0)]
    return {"selection_size": int(selection_size), "per_task": per_task}


def task_id_accuracy(tii: Sequence[Sequence[Optional[float]]]) -> Optional[Dict[str, Any]]:
    """``{"final": {"j": %}, "diagonal": {"j": %}, "final_mean": %}`` from the T×T matrix of
    task-identity accuracies (row t: after task t; None where the method inferred nothing)."""
    if not tii or not any(v is not None for row in tii for v in row):
        return None
    T = len(tii)
    final = {str(j): tii[T - 1][j] for j in range(T) if tii[T - 1][j] is not None}
    diagonal = {str(j): tii[j][j] for j in range(T) if tii[j][j] is not None}
    vals = list(final.values())
    return {"final": final, "diagonal": diagonal, "final_mean": float(np.mean(vals)) if vals else None}


def method_traits(method: Any, tasks: Sequence[Any]) -> Dict[str, bool]:
    """Traits of a trained ``method`` over the scenario's ``tasks`` (see the module doc)."""
    from methods.alignment import ClassStats

    try:  # phases() of a method is cheap and side-effect free by contract; guard anyway
        trains = [bool(method.phases(t)) for t in tasks]
    except Exception:  # noqa: BLE001 - a trait is a label; never fail a finished run over it
        trains = []
    first_only = len(trains) > 1 and trains[0] and not any(trains[1:])
    backbone_ids = {id(p) for p in method.backbone.parameters()}
    trains_backbone = bool(getattr(method.backbone, "trainable", False))
    if not trains_backbone and trains:
        for t in tasks:
            for ph in method.phases(t):
                groups = ph.param_groups if ph.param_groups is not None else method.param_groups()
                if any(id(p) in backbone_ids for g in groups for p in g["params"]):
                    trains_backbone = True
    stats = any(isinstance(m, ClassStats) for m in method.modules())
    stats = stats or any(k.startswith("class_") for k in (method.state_numbers() or {}))
    stats = stats or any("prototype" in n for n, _ in method.named_buffers() if not n.startswith("backbone."))
    return {"first_task_only": first_only, "trains_backbone": trains_backbone, "class_statistics": stats}


def trait_marks(traits: Optional[Dict[str, bool]]) -> str:
    """Short marks for a table cell: ¹ first task only, ᴮ trains the backbone, ˢ class statistics."""
    if not traits:
        return ""
    marks: List[str] = []
    if traits.get("first_task_only"):
        marks.append("¹")
    if traits.get("trains_backbone"):
        marks.append("ᴮ")
    if traits.get("class_statistics"):
        marks.append("ˢ")
    return "".join(marks)

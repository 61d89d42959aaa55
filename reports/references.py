"""Numbers reported by the papers (``benchmarks/tables/references/*.yaml``), loaded and validated.

File format (documented in ``docs/reports.md``, "Reported numbers"): a mapping with ``paper``,
optional ``defaults`` applied to every entry, and ``entries``; each entry names the source's row
label (``method``), our registry name (``ours``, null when the suite has no counterpart), the
setting (``benchmark``, ``num_tasks``, ``backbone``, ``protocol``, optional ``match`` on dotted
keys of our resolved config), the ``metric``, ``value`` (and optional ``std``), and its provenance
(``tag`` V or R, ``source``, ``table``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from reports.loader import ReportError

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "tables" / "references"

# metric name -> (label, unit, where ours comes from)
REFERENCE_METRICS: Dict[str, str] = {
    "faa": "FAA (%)",
    "caa": "CAA (%)",
    "ffm": "FFM (%)",
    "ffm_prior": "FFM, max before the last step (%)",
    "coda_f": "CODA F_N (%)",
    "bwt": "BWT (%)",
    "acc_seen_final": "accuracy over seen samples, last step (%)",
    "acc_seen_avg": "accuracy over seen samples, mean over steps (%)",
    "added_params_m": "added params (M)",
    "train_gflops_paper": "train GFLOPs/img (paper convention)",
    "inference_gflops_paper": "inference GFLOPs/img (paper convention)",
}
REQUIRED = ("method", "benchmark", "num_tasks", "metric", "value", "tag", "source")


@dataclass
class Reference:
    """One reported number and the exact setting it was reported for."""

    file: str
    paper: str
    method: str
    ours: Optional[str]
    benchmark: str
    num_tasks: int
    metric: str
    value: float
    tag: str
    source: str
    std: Optional[float] = None
    std_tag: Optional[str] = None
    backbone: Optional[str] = None
    protocol: Optional[str] = None
    table: Optional[str] = None
    note: Optional[str] = None
    match: Dict[str, Any] = field(default_factory=dict)


def load_references(directory: str | Path = REFERENCE_DIR) -> List[Reference]:
    """Every entry of every ``*.yaml`` under ``directory``, with the file's defaults applied."""
    out: List[Reference] = []
    for path in sorted(Path(directory).glob("*.yaml")):
        out += load_reference_file(path)
    return out


def load_reference_file(path: Path) -> List[Reference]:
    """Entries of one references file; a malformed entry is a ReportError naming file and entry."""
    try:
        doc = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"references file {path} is not valid YAML: {e}") from None
    defaults = doc.get("defaults") or {}
    refs = []
    for i, raw in enumerate(doc.get("entries") or []):
        e = {**defaults, **(raw or {})}
        missing = [k for k in REQUIRED if e.get(k) is None]
        if missing:
            raise ReportError(f"{Path(path).name} entry {i + 1} lacks {', '.join(missing)}")
        if e["metric"] not in REFERENCE_METRICS:
            raise ReportError(f"{Path(path).name} entry {i + 1} has unknown metric '{e['metric']}'; "
                              f"known: {', '.join(REFERENCE_METRICS)}")
        if str(e["tag"]) not in ("V", "R"):
            raise ReportError(f"{Path(path).name} entry {i + 1} has tag '{e['tag']}'; use V or R")
        unknown = set(e) - set(Reference.__dataclass_fields__) - {"paper"}
        if unknown:
            raise ReportError(f"{Path(path).name} entry {i + 1} has unknown keys {', '.join(sorted(unknown))}")
        refs.append(Reference(
            file=Path(path).name, paper=str(doc.get("paper", Path(path).stem)), method=str(e["method"]),
            ours=e.get("ours"), benchmark=str(e["benchmark"]), num_tasks=int(e["num_tasks"]), metric=e["metric"],
            value=float(e["value"]), tag=str(e["tag"]), source=str(e["source"]),
            std=None if e.get("std") is None else float(e["std"]), std_tag=e.get("std_tag"),
            backbone=e.get("backbone"), protocol=e.get("protocol"), table=e.get("table"), note=e.get("note"),
            match=dict(e.get("match") or {}),
        ))
    return refs


def config_value(cfg: Dict[str, Any], dotted: str) -> Any:
    """``config_value(cfg, "method.variant")``; a missing key gives the sentinel :data:`MISSING`."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()

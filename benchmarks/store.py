"""Run directories, atomic writes, run status and checkpoints.

Layout: ``<out>/<benchmark>/<method>/seed<k>/`` holding

* ``config.yaml``   the resolved configuration;
* ``status.json``   ``running`` (with host and pid) / ``failed`` (with the error) /
  ``interrupted`` (a stop signal; a checkpoint was saved) / ``done``; a run killed outright
  (SIGKILL, node failure) stays ``running``;
* ``log.txt``       one line per epoch / task phase / evaluation, with the elapsed time;
* ``metrics.jsonl`` one JSON object per training epoch and per evaluation (benchmarks/runlog.py);
  ``tensorboard/`` the same as TensorBoard events with ``--tensorboard``;
* ``checkpoint.pt`` the state after the last finished task, or mid-task after an epoch
  (``train.checkpoint_every_epochs``) or a stop signal, for ``--resume`` (see runner.py);
* ``result.json``   written once, at the end, by an atomic rename.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
or a kill never leaves a half-written file, and a failed re-run never replaces a good result.
In a data-parallel run only rank 0 writes (the other ranks hold a read-only store).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml


def run_dir(out: str | Path, benchmark: str, method: str, seed: int) -> Path:
    return Path(out) / benchmark / method / f"seed{seed}"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically; NaN / inf become null (strict JSON)."""
    data = json.dumps(_nan_to_none(obj), indent=1, default=_json_default, allow_nan=False).encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def config_hash(cfg: Dict[str, Any]) -> str:
    """Hash of the settings that define a run's outcome (not device, quiet, ...)."""
    ignore = {"device", "quiet", "compile", "query_cache", "tensorboard"}
    core = {k: v for k, v in cfg.items() if k not in ignore}
    if isinstance(core.get("train"), dict):
        core["train"] = {k: v for k, v in core["train"].items() if k not in ("num_workers", "eval_batch_size", "checkpoint_every_epochs")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunStore:
    """One run directory. ``writable=False`` (data-parallel ranks > 0): every write is a no-op."""

    def __init__(self, path: Path, writable: bool = True) -> None:
        self.path = Path(path)
        self.writable = writable

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def create(self) -> None:
        if self.writable:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: Dict[str, Any]) -> None:
        if self.writable:
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    def status(self) -> Optional[Dict[str, Any]]:
        p = self.path / "status.json"
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None

    def set_status(self, status: str, **extra: Any) -> None:
        if self.writable:
            atomic_write_json(self.path / "status.json", {"status": status, "time": now(), **extra})

    def is_done(self) -> bool:
        st = self.status()
        return self.result_path.exists() and (st is None or st.get("status") == "done")

    def log(self, msg: str) -> None:
        if not self.writable:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "log.txt", "a") as f:
            f.write(f"{now()} {msg}\n")

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        if self.writable:
            atomic_torch_save(self.checkpoint_path, state)

    def load_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The checkpoint, or None when there is none; an unreadable file raises ``ValueError``."""
        if not self.checkpoint_path.exists():
            return None
        try:
            ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated by hand, another program's file, ...
            raise ValueError(f"{self.checkpoint_path} is unreadable ({type(e).__name__})") from None
        if not isinstance(ckpt, dict) or "task" not in ckpt or "state" not in ckpt:
            raise ValueError(f"{self.checkpoint_path} is not a run checkpoint of this suite")
        return ckpt

    def write_result(self, result: Dict[str, Any]) -> None:
        if self.writable:
            atomic_write_json(self.result_path, result)

    def read_result(self) -> Dict[str, Any]:
        return json.loads(self.result_path.read_text())

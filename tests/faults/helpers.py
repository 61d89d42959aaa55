"""Helpers of the fault suite: tiny CPU runs, one-line-error checks, snapshots, fault injectors.

Every test here injects one fault (a second process, a corrupted or planted file, a write that
fails with ENOSPC after N bytes, a signal) and checks the promise of docs/reliability.md: one
sentence naming the cause, exit status 2 (or 128 + signal), no earlier result lost or changed,
no half-written file, no code executed, nothing written outside --out.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path
from typing import Dict, List, Tuple

import bench

TINY_SET = ["benchmark.num_tasks=3", "benchmark.num_classes=6", "benchmark.train_per_class=6",
            "benchmark.test_per_class=3", "backbone.pretrained=none", "train.epochs=1", "train.batch_size=8",
            "train.eval_batch_size=16"]


def run_args(out: Path, *extra: str, method: str = "linear_probe", sets: Tuple[str, ...] = ()) -> List[str]:
    return ["run", "-b", "synthetic", "-m", method, "--out", str(out), "--device", "cpu", "--quiet", *extra,
            "--set", *TINY_SET, *sets]


def run_dir(out: Path, method: str = "linear_probe", seed: int = 0) -> Path:
    return Path(out) / "synthetic-3t" / method / f"seed{seed}"


def cli(args: List[str], capsys) -> Tuple[int, str, str]:
    """bench.main in this process: (exit status, stderr stripped, stdout)."""
    code = bench.main(args)
    cap = capsys.readouterr()
    return code, cap.err.strip(), cap.out


def one_sentence(err: str) -> bool:
    """The user sees one line that starts with 'error: ' (no traceback)."""
    return err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def snapshot(folder: Path) -> Dict[Path, bytes]:
    """Every file below ``folder`` with its bytes (symlinks as their target text)."""
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[p] = b"->" + os.readlink(p).encode()
        elif p.is_file():
            out[p] = p.read_bytes()
    return out


def half_written(folder: Path) -> List[Path]:
    """Temporary or empty files (what a crash mid-write leaves)."""
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
            and (p.name.endswith(".tmp") or ".tmp-" in str(p) or p.stat().st_size == 0)]


class _QuotaFile:
    """A file object whose writes fail with ENOSPC once the shared quota is spent (partial write first)."""

    def __init__(self, f, quota: "DiskQuota") -> None:
        self._f, self._q = f, quota

    def write(self, data):
        n = len(data)
        if n > self._q.left:
            if self._q.left > 0:
                self._f.write(data[: self._q.left])
            self._q.left = 0
            self._q.failures += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self._q.left -= n
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


class DiskQuota:
    """Make every write to a file under ``root`` fail with ENOSPC after ``budget`` bytes in total
    (patches ``open`` / ``io.open``, which ``os.fdopen``, pathlib, pandas and matplotlib go through)."""

    def __init__(self, monkeypatch, root: Path, budget: int) -> None:
        self.root, self.left, self.failures = str(Path(root).resolve()), budget, 0
        real = getattr(io.open, "real_open", io.open)  # a new quota replaces an earlier one, never nests

        def quota_open(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            if not any(c in mode for c in "wax+"):
                return f
            try:
                name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(file)
            except OSError:
                return f
            return _QuotaFile(f, self) if str(name).startswith(self.root) else f

        quota_open.real_open = real
        monkeypatch.setattr(io, "open", quota_open)
        monkeypatch.setattr(builtins, "open", quota_open)


class Payload:
    """Unpickling this calls ``open(marker, 'w')``: a planted file that would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))

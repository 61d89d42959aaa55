"""Run directories, atomic writes, run status and checkpoints.

Layout: ``<out>/<benchmark>/<method>/seed<k>/`` holding

* ``config.yaml``   the resolved configuration;
* ``status.json``   ``running`` (with host and pid) / ``failed`` (with the error) /
  ``interrupted`` (a stop signal; a checkpoint was saved) / ``done``; a run killed outright
  (SIGKILL, node failure) stays ``running``;
* ``log.txt``       one line per epoch / task phase / evaluation, with the elapsed time;
* ``metrics.jsonl`` one JSON object per training epoch and per evaluation (benchmarks/run/runlog.py);
  ``tensorboard/`` the same as TensorBoard events with ``--tensorboard``;
* ``checkpoint.pt`` the state after the last finished task, or mid-task after an epoch
  (``train.checkpoint_every_epochs``) or a stop signal, for ``--resume`` (see runner.py);
* ``result.json``   written once, at the end, by an atomic rename;
* ``checkpoint.pt.sha256`` / ``result.json.sha256``  their SHA-256 (``sha256sum -c`` format),
  checked whenever they are read;
* ``.lock``         the ``flock`` of the one process writing the folder (its pid inside).

Every file is written to a temporary name in the same folder and renamed into place, so a crash
or a kill never leaves a half-written file, and a failed re-run never replaces a good result.
Files get the user's umask (0666 less it); ``log.txt`` is never written through a symlink. A full
disk is one :class:`DiskFullError` sentence ("no space left on DEVICE while writing FILE").
Checkpoints hold plain tensors and containers and are loaded with ``weights_only=True``.
In a data-parallel run only rank 0 writes (the other ranks hold a read-only store).
See docs/reliability.md for the promises and tests/faults/ for the tests that hold them.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import yaml

# torch is imported where it is used: reports read result.json through this module without it

# The checkpoint format this version writes and reads: plain tensors and containers, loaded with
# ``torch.load(weights_only=True)`` (format 2 pickled numpy objects and needed weights_only=False).
CHECKPOINT_FORMAT = 3
TAG_CHARS = "letters, digits, '.', '_' and '-'"


class StoreError(RuntimeError):
    """A run folder cannot be written or read as promised; the message is one sentence for the user."""


class DiskFullError(StoreError):
    """A write failed for lack of space (ENOSPC / EDQUOT); nothing half-written is left behind."""


class RunLockedError(StoreError):
    """Another live process is writing the run folder."""


class DamagedFileError(StoreError, ValueError):
    """A checkpoint or result file is unreadable, or does not match its recorded SHA-256."""


def _mount_of(path: Path) -> str:
    """``/dev/sda1 (mounted on /data)`` for the filesystem holding ``path`` (best effort)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    try:
        for line in open("/proc/self/mounts"):
            dev, mnt = line.split()[:2]
            if mnt == str(p):
                return f"{dev} (mounted on {p})"
    except OSError:
        pass
    return str(p)


def disk_full_error(path: Path) -> DiskFullError:
    return DiskFullError(f"no space left on {_mount_of(path)} while writing {path}; free some space and run the "
                         f"same command again (nothing half-written was kept)")


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def file_mode() -> int:
    """The mode of every file the suite writes: 0666 less the user's umask (like ``open``)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # no /proc: read the umask by setting it (and restore it at once)
    os.umask(old)
    return 0o666 & ~old


def validate_tag(tag: Optional[str]) -> None:
    """A tag names a folder (``method@tag``): a plain name, never a path."""
    if tag is None:
        return
    t = str(tag)
    ok = t and t not in (".", "..") and len(t) <= 100 and all(c.isascii() and (c.isalnum() or c in "._-") for c in t)
    if not ok:
        from benchmarks.config import ConfigError

        raise ConfigError(f"tag {t!r} is not a plain name; use {TAG_CHARS} only (it names the folder method@tag)")


def check_out_folder(out: str | Path, flag: str = "--out") -> None:
    """``--out`` must be a folder or not exist yet (nor any of its parents be a file)."""
    from benchmarks.config import ConfigError

    p = Path(out)
    for q in [p, *p.parents]:
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                what = f"{flag} {out}" if q == p else f"{q} (a parent of {flag} {out})"
                raise ConfigError(f"{what} is a file, not a folder; pass a folder")
            return


def run_dir(out: str | Path, benchmark: str, method: str, seed: int) -> Path:
    return Path(out) / benchmark / method / f"seed{seed}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_digests(path: Path) -> Optional[List[str]]:
    """The SHA-256 values accepted for ``path`` (``sha256sum`` format), or None without a digest file."""
    d = digest_path(path)
    if not d.is_file():
        return None
    return [ln.split()[0] for ln in d.read_text(errors="replace").splitlines() if ln.strip()]


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` (fsync), then rename it into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path) from None
        raise
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(path) from None
        raise


def write_with_digest(path: Path, data: bytes, digest: bool = True) -> None:
    """Atomic write; with ``digest`` the SHA-256 goes into ``<name>.sha256`` beside it.

    The digest file accepts the new and the old value while the file is renamed into place, so
    a kill between the two renames never makes a good file look damaged.
    """
    path = Path(path)
    if not digest:
        _write_file(path, data)
        return
    new = sha256_bytes(data)
    old = [h for h in (read_digests(path) or []) if h != new] if path.exists() else []
    _write_file(digest_path(path), "".join(f"{h}  {path.name}\n" for h in [new] + old).encode())
    _write_file(path, data)
    _write_file(digest_path(path), f"{new}  {path.name}\n".encode())


def verify_digest(path: Path, data: bytes, required: bool) -> None:
    """Raise DamagedFileError when ``data`` does not match ``path``'s digest file (or it is missing and required)."""
    accepted = read_digests(path)
    if accepted is None:
        if required:
            raise DamagedFileError(f"{path} has no digest file ({digest_path(path).name}), so it was not written by "
                                   f"this version of the suite")
        return
    if sha256_bytes(data) not in accepted:
        raise DamagedFileError(f"{path} is damaged: its SHA-256 does not match {digest_path(path).name}")


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    buf = io.BytesIO()
    write(buf)
    _write_file(Path(path), buf.getvalue())


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


def atomic_write_json(path: Path, obj: Any, digest: bool = False) -> None:
    """Write JSON atomically; NaN / inf become null (strict JSON)."""
    data = json.dumps(_nan_to_none(obj), indent=1, default=_json_default, allow_nan=False).encode()
    write_with_digest(Path(path), data, digest)


def atomic_write_text(path: Path, text: str) -> None:
    _write_file(Path(path), text.encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    _atomic_write(Path(path), lambda f: torch.save(obj, f))


# --- checkpoints as plain tensors and containers (loadable with weights_only=True) ----------

_NP = "__numpy__"


def to_plain_state(o: Any) -> Any:
    """numpy arrays / scalars (e.g. numpy's RNG state) -> tensors / Python numbers, marked for the way back.

    Containers without numpy inside are returned as they are (a state_dict keeps its type and
    ``_metadata``); the others are rebuilt with the same type.
    """
    if isinstance(o, np.ndarray):
        import torch

        return {_NP: torch.from_numpy(np.ascontiguousarray(o).copy())}
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, dict):
        new = {k: to_plain_state(v) for k, v in o.items()}
        if all(new[k] is o[k] for k in o):
            return o
        out = type(o)(new) if type(o) is not dict else new
        if hasattr(o, "_metadata"):
            out._metadata = o._metadata
        return out
    if isinstance(o, (list, tuple)):
        new_l = [to_plain_state(v) for v in o]
        if all(a is b for a, b in zip(new_l, o)):
            return o
        return new_l if isinstance(o, list) else tuple(new_l)
    return o


def from_plain_state(o: Any) -> Any:
    if isinstance(o, dict):
        if len(o) == 1 and _NP in o:
            return o[_NP].numpy()
        new = {k: from_plain_state(v) for k, v in o.items()}
        if all(new[k] is o[k] for k in o):
            return o
        return new
    if isinstance(o, (list, tuple)):
        new_l = [from_plain_state(v) for v in o]
        if all(a is b for a, b in zip(new_l, o)):
            return o
        return new_l if isinstance(o, list) else tuple(new_l)
    return o


def config_hash(cfg: Dict[str, Any]) -> str:
    """Hash of the settings that define a run's outcome (not device, quiet, ...)."""
    ignore = {"device", "quiet", "compile", "query_cache", "tensorboard"}
    core = {k: v for k, v in cfg.items() if k not in ignore}
    if isinstance(core.get("train"), dict):
        core["train"] = {k: v for k, v in core["train"].items() if k not in ("num_workers", "eval_batch_size", "checkpoint_every_epochs")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")



def append_line(p: Path, line: str) -> None:
    """Append ``line`` and a newline to the run file ``p`` (log.txt, metrics.jsonl).

    O_NOFOLLOW: a file planted as a symlink is refused, never written through; created with the
    user's umask mode like every other output; a full disk is one sentence.
    """
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode())
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"{p} is a symbolic link; the suite does not write through links (remove it)") from None
        if is_disk_full(e):
            raise disk_full_error(p) from None
        raise
    try:
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(p) from None
        raise

class RunStore:
    """One run directory. ``writable=False`` (data-parallel ranks > 0): every write is a no-op."""

    def __init__(self, path: Path, writable: bool = True) -> None:
        self.path = Path(path)
        self.writable = writable
        self._lock_fd: Optional[int] = None

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def create(self) -> None:
        if self.writable:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                if is_disk_full(e):
                    raise disk_full_error(self.path) from None
                raise

    # --- one writer per run folder -------------------------------------------------------
    # fcntl.flock (not a lock library): the lock dies with its process, so a SIGKILL or a node
    # failure never leaves a stale lock, and the holder's pid is written into the lock file for
    # the refusal message. Only this module takes the lock.

    def lock(self) -> None:
        """Become the only writer of the folder (created if needed), or raise RunLockedError naming the holder.

        Also removes temporary files that a killed writer left (``.checkpoint.pt.*.tmp``).
        """
        if not self.writable or self._lock_fd is not None:
            return
        self.create()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode())
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.lock_path) from None
            if e.errno == errno.ELOOP:
                raise StoreError(f"{self.lock_path} is a symbolic link; the suite does not write through links "
                                 f"(remove it)") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._locked_error(self._holder_text()) from None
        except OSError as e:  # a file system without flock: refuse rather than allow two writers
            os.close(fd)
            raise StoreError(f"cannot lock {self.lock_path} ({e.strerror}); this file system does not support flock, "
                             f"so the run folder cannot be kept to one writer; use another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": _hostname(), "since": now()}).encode())
        except OSError as e:  # a full disk: the lock is held all the same
            if not is_disk_full(e):
                os.close(fd)
                raise
        self._lock_fd = fd
        if (self.path / "log.txt").is_symlink():  # refused before anything is written
            self.unlock()
            raise StoreError(f"{self.path / 'log.txt'} is a symbolic link; the suite does not write through links "
                             f"(remove it)")
        for tmp in self.path.glob(".*.tmp"):  # left by a writer killed mid-write; we are the only writer now
            try:
                tmp.unlink()
            except OSError:
                pass

    def _locked_error(self, holder: str) -> RunLockedError:
        return RunLockedError(f"{self.path} is being written by {holder}; wait for it to finish or stop it "
                              f"(one run folder has one writer)")

    def refuse_if_written(self) -> None:
        """RunLockedError when another process writes the folder now (checked before anything else)."""
        holder = self.writer()
        if holder is not None:
            raise self._locked_error(holder)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _holder_text(self) -> str:
        try:
            info = json.loads(self.lock_path.read_text())
            return f"process {int(info['pid'])} on {info.get('host', '?')} (since {info.get('since', '?')})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def writer(self) -> Optional[str]:
        """Who writes the folder right now ('process 123 on host ...'), or None when nobody does."""
        if self._lock_fd is not None:
            return None
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._holder_text()
        finally:
            os.close(fd)
        return None

    def is_stale(self) -> bool:
        """True when status.json says ``running`` but no process holds the folder (it was killed)."""
        st = self.status() or {}
        return st.get("status") == "running" and self.writer() is None

    # --- files ---------------------------------------------------------------------------

    def write_config(self, cfg: Dict[str, Any]) -> None:
        if self.writable:
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    def status(self) -> Optional[Dict[str, Any]]:
        p = self.path / "status.json"
        if not p.exists():
            return None
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        return st if isinstance(st, dict) else None

    def set_status(self, status: str, **extra: Any) -> None:
        if self.writable:
            atomic_write_json(self.path / "status.json", {"status": status, "time": now(), **extra})

    def drop_status(self) -> None:
        """Remove status.json (when even a small write fails: better no status than a false ``running``)."""
        if self.writable:
            try:
                (self.path / "status.json").unlink()
            except OSError:
                pass

    def is_done(self) -> bool:
        st = self.status()
        return self.result_path.exists() and (st is None or st.get("status") == "done")

    def log(self, msg: str) -> None:
        if not self.writable:
            return
        self.create()
        append_line(self.path / "log.txt", f"{now()} {msg}")

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        if self.writable:
            import torch

            buf = io.BytesIO()
            torch.save(to_plain_state(state), buf)  # into memory: a full disk is a plain OSError below
            write_with_digest(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self, verify: bool = True) -> Optional[Dict[str, Any]]:
        """The checkpoint, or None when there is none; an unreadable or damaged file raises ``DamagedFileError``.

        Loaded with ``weights_only=True`` (plain tensors and containers only: a planted pickle
        cannot run code). ``verify``: also check the SHA-256 in ``checkpoint.pt.sha256``.
        """
        import torch

        if not self.checkpoint_path.exists():
            return None
        try:
            data = self.checkpoint_path.read_bytes()
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated by hand, another program's file, a pickle with code in it, ...
            why = "it holds objects other than tensors and plain containers" if "Weights only load failed" in str(e) \
                else type(e).__name__
            raise DamagedFileError(f"{self.checkpoint_path} is unreadable ({why})") from None
        if not isinstance(ckpt, dict) or "task" not in ckpt or "state" not in ckpt:
            raise DamagedFileError(f"{self.checkpoint_path} is not a run checkpoint of this suite")
        if verify:
            self.verify_checkpoint(data)
        return from_plain_state(ckpt)

    def verify_checkpoint(self, data: Optional[bytes] = None) -> None:
        verify_digest(self.checkpoint_path, self.checkpoint_path.read_bytes() if data is None else data, required=True)

    def write_result(self, result: Dict[str, Any]) -> None:
        if self.writable:
            atomic_write_json(self.result_path, result, digest=True)

    def read_result(self) -> Dict[str, Any]:
        """result.json, checked against its digest; a damaged file raises ``DamagedFileError`` naming it."""
        return read_result_file(self.result_path)


def read_result_file(path: Path) -> Dict[str, Any]:
    """A result.json: valid JSON holding an object, matching ``result.json.sha256`` when there is one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DamagedFileError(f"{path} is unreadable ({e.strerror or type(e).__name__})") from None
    try:
        res = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFileError(f"{path} is damaged (not valid JSON: {str(e).splitlines()[0]})") from None
    if not isinstance(res, dict):
        raise DamagedFileError(f"{path} is damaged (it holds a {type(res).__name__}, not an object)")
    verify_digest(path, data, required=False)  # valid JSON that is no longer what was written
    return res


def _hostname() -> str:
    import socket

    return socket.gethostname()

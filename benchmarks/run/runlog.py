"""What a run reports while it trains: rounded log lines, ``metrics.jsonl`` and TensorBoard.

Every run directory gets ``metrics.jsonl``, one JSON object per line:

* ``{"event": "epoch", "task": t, "phase": name, "epoch": e, "epochs": E, "loss": mean over the
  epoch's steps, "last_loss", "steps", "lr" (of the epoch's last step), "epoch_seconds",
  "elapsed_seconds"}`` after every training epoch (tasks and epochs count from 1);
* ``{"event": "eval", "task": t, "acc": [per seen task, %], "avg_acc", "acc_seen_samples",
  "elapsed_seconds"}`` after every task's evaluation.

``elapsed_seconds`` counts from the start of this process's part of the run (a resumed run
starts again at 0; its log says "resumed from"). Numbers are full precision in the file and
rounded to 4 significant digits in the log lines (:func:`sig4`).

``--tensorboard`` (config key ``tensorboard``) also writes the same scalars as TensorBoard event
files under ``<run dir>/tensorboard`` with ``torch.utils.tensorboard`` (tags ``train/loss``,
``train/lr`` per epoch across tasks, ``eval/avg_acc`` and ``eval/acc_task<j>`` per task);
tensorboard is an optional package, and without it the run stops before writing anything,
with one sentence saying how to install it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.config import ConfigError

TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard package, which is not installed "
                       "(pip install tensorboard, or run without --tensorboard)")


def sig4(x: Optional[float]) -> str:
    """``x`` rounded to 4 significant digits (``0.16035379`` -> ``0.1604``; None -> ``n/a``)."""
    return "n/a" if x is None else f"{x:.4g}"


def fmt_elapsed(seconds: float) -> str:
    """``[   12.3s]``: the prefix of every log line of a run."""
    return f"[{seconds:7.1f}s]"


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError (exit status 2) when missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package itself
        raise ConfigError(TENSORBOARD_MISSING) from None
    return SummaryWriter


class RunMetrics:
    """Writes ``metrics.jsonl`` (and TensorBoard events) for one run; no-op when not ``writable``."""

    def __init__(self, run_path: Path, log, writable: bool = True, tensorboard: bool = False,
                 writer_class: Any = None, fresh: bool = False) -> None:
        self.path = Path(run_path) / "metrics.jsonl"
        if writable and fresh:  # a new or overwritten run starts its own file; a resumed run appends
            self.path.unlink(missing_ok=True)
        self.log = log
        self.writable = writable
        self.t0 = time.time()
        self.writer = None
        self._epoch_step = 0  # TensorBoard x-axis of the training curves: epochs over all tasks
        if writable and tensorboard:
            cls = writer_class or require_tensorboard()
            self.writer = cls(log_dir=str(Path(run_path) / "tensorboard"))

    def elapsed(self) -> float:
        return time.time() - self.t0

    def _write(self, row: Dict[str, Any]) -> None:
        if not self.writable:
            return
        from benchmarks.run.store import append_line

        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_line(self.path, json.dumps(row))

    def epoch(self, task, phase: str, epoch: int, epochs: int, loss: float, last_loss: float, steps: int,
              lr: float, seconds: float) -> None:
        """One training epoch (``epoch`` counts from 0 here, from 1 in the file and the log)."""
        t = task.index + 1
        self._write({"event": "epoch", "task": t, "phase": phase, "epoch": epoch + 1, "epochs": epochs, "loss": loss,
                     "last_loss": last_loss, "steps": steps, "lr": lr, "epoch_seconds": seconds,
                     "elapsed_seconds": self.elapsed()})
        self.log(f"task {t}/{task.num_tasks} {phase} epoch {epoch + 1}/{epochs}: loss {sig4(loss)} "
                 f"(last step {sig4(last_loss)}), lr {sig4(lr)}, {steps} steps, {seconds:.1f}s")
        if self.writer is not None:
            self._epoch_step += 1
            self.writer.add_scalar("train/loss", loss, self._epoch_step)
            self.writer.add_scalar("train/lr", lr, self._epoch_step)

    def evaluation(self, task_index: int, num_tasks: int, acc: List[float], seen_samples: float) -> None:
        """Accuracies (%) of every seen task after training task ``task_index`` (from 0)."""
        t = task_index + 1
        avg = sum(acc) / len(acc)
        self._write({"event": "eval", "task": t, "acc": acc, "avg_acc": avg, "acc_seen_samples": seen_samples,
                     "elapsed_seconds": self.elapsed()})
        self.log(f"task {t}/{num_tasks} eval: acc " + " ".join(sig4(a) for a in acc) + f" | avg {sig4(avg)}")
        if self.writer is not None:
            self.writer.add_scalar("eval/avg_acc", avg, t)
            for j, a in enumerate(acc):
                self.writer.add_scalar(f"eval/acc_task{j + 1}", a, t)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

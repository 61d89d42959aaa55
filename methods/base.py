"""The method interface shared by every method and baseline.

A method is an ``nn.Module`` that owns its prompts and head and uses the shared
:class:`~methods.vit.PromptedViT`. The protocol (``benchmarks/run/protocol.py``), not the method, does
logit masking, optimisers and schedules, epochs, evaluation and checkpoints. The life of a method
in one run::

    method = create_method(name, backbone, num_classes, cfg)
    for task in tasks:
        method.begin_task(task)
        for phase in method.phases(task):          # usually one; SMoPE adds a dense warm-up,
            train epochs of phase                   # HiDe-Prompt its TII stage
        method.end_task(task, ctx)                  # statistics, alignment, usage counters
        evaluate every seen task with method(x)     # per sample, no task id
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.vit import PromptedViT


@dataclass
class Task:
    """One task of a class-incremental scenario (labels are remapped in task order)."""

    index: int
    num_tasks: int
    class_start: int  # first label of this task
    class_end: int  # one past the last label of this task
    class_offsets: List[int] = field(default_factory=list)  # label start of every task, plus the total

    @property
    def classes(self) -> range:
        return range(self.class_start, self.class_end)

    @property
    def num_seen(self) -> int:
        """Number of classes seen up to and including this task (labels 0..num_seen-1)."""
        return self.class_end

    @property
    def num_old(self) -> int:
        """Number of classes of earlier tasks."""
        return self.class_start

    def task_of_class(self, labels: Tensor) -> Tensor:
        """Map labels to task indices with the scenario's class offsets."""
        offsets = torch.as_tensor(self.class_offsets[1:], device=labels.device)
        return torch.bucketize(labels, offsets, right=True)


@dataclass
class MethodOutput:
    """What ``ContinualMethod.forward`` returns.

    ``logits`` cover all classes of the scenario (the protocol masks them); ``aux_loss`` is
    added to the classification loss during training; ``diagnostics`` may hold

    * ``selection``: integer ids (B, ..., k) of the prompts / experts each sample used; the
      protocol turns them into usage histograms (over ids in ``[0, method.selection_size)``,
      one histogram per middle index, e.g. per layer and head);
    * ``task_pred``: (B,) predicted task index, scored as task-identity accuracy.
    """

    logits: Tensor
    aux_loss: Optional[Tensor] = None
    features: Optional[Tensor] = None
    diagnostics: Dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Phase:
    """One training phase of a task: a fresh optimiser and schedule, then ``epochs`` epochs.

    ``train`` holds overrides of the run's ``TrainConfig`` for this phase (``epochs``, ``lr``,
    ``optimizer``, ``schedule`` ...). ``forward_kwargs`` are passed to ``forward`` during the
    phase. ``param_groups`` defaults to ``method.param_groups()``. ``needs_images`` False means
    the phase uses only query features (e.g. HiDe's TII network): once the query cache holds every
    training query of the task (deterministic train transform), the protocol's later epochs iterate
    labels and cached queries and load no image (``benchmarks/run/protocol.py`` ``LabelsOnly``).
    ``needs_query`` False skips the query pass in a phase that does not use it (None: the
    method's ``uses_query``).
    """

    name: str = "train"
    train: Dict[str, Any] = field(default_factory=dict)
    forward_kwargs: Dict[str, Any] = field(default_factory=dict)
    param_groups: Optional[List[Dict[str, Any]]] = None
    needs_images: bool = True
    needs_query: Optional[bool] = None


@dataclass
class NoConfig:
    """Methods without hyper-parameters use this empty config."""


class ContinualMethod(nn.Module):
    """Base class of every method and baseline. Subclasses register with ``@register_method``.

    Class attributes a subclass may set:

    * ``Config``: its typed hyper-parameter dataclass (``--set method.<field>=...``);
    * ``uses_query``: needs the frozen query pass (the protocol computes and caches it and passes
      it as ``query=``; called without it, ``forward`` computes it itself, as cost counting does);
    * ``joint``: trains on the data of every task seen so far (the joint upper bound);
    * ``selection_size``: number of selectable prompt / expert ids, for usage histograms;
    * ``prompt_based``: ``False`` for a registered method that is not a prompt method (the
      first-session / backbone-training methods APER, RanPAC, SLCA, EASE), so that summaries such
      as the demo's finetune < prompt method < joint check name what they compare.
    """

    name: ClassVar[str] = "base"
    is_baseline: ClassVar[bool] = False
    Config: ClassVar[type] = NoConfig
    uses_query: ClassVar[bool] = False
    joint: ClassVar[bool] = False
    selection_size: Optional[int] = None
    prompt_based: ClassVar[bool] = True

    def __init__(self, backbone: PromptedViT, num_classes: int, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.cfg = cfg
        self.current_task: Optional[Task] = None

    # -- life cycle -----------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        """Called before training ``task``: allocate / freeze prompt parts, snapshots, ..."""
        self.current_task = task

    def phases(self, task: Task) -> List[Phase]:
        """Training phases of ``task``; one phase of ``train.epochs`` epochs by default."""
        return [Phase("train")]

    def param_groups(self) -> List[Dict[str, Any]]:
        """Parameter groups to optimise, each ``{"params": [...], "lr_mult": float, "name": str}``."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr_mult": 1.0, "name": "all"}]

    def forward(self, x: Tensor, query: Optional[Tensor] = None, **kwargs: Any) -> MethodOutput:
        raise NotImplementedError

    def training_loss(self, out: MethodOutput, y: Tensor, logit_mask: Optional[Tensor]) -> Tensor:
        """Classification loss on masked logits plus the method's auxiliary loss."""
        logits = out.logits if logit_mask is None else out.logits.masked_fill(~logit_mask, float("-inf"))
        loss = F.cross_entropy(logits.float(), y)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        return loss

    def end_task(self, task: Task, ctx: "Any") -> None:
        """Called after training ``task`` (``ctx`` is a :class:`benchmarks.run.protocol.TaskContext`)."""

    def diagnostics(self) -> Dict[str, Any]:
        """JSON-serialisable method-level diagnostics stored in result.json (e.g. usage counts)."""
        return {}

    # -- cost hooks (benchmarks/cost/engine.py) ---------------------------------------------------
    def used_parameters(self) -> Optional[int]:
        """Added parameters actually used by the current task's forward, when fewer than the
        allocated ones (CODA-Prompt allocates every task's components up front; task-specific
        pools hold prompts of future tasks). None: every allocated parameter is used."""
        return None

    def trainable_parameters(self) -> Optional[int]:
        """Parameters the current task actually updates, when fewer than the ones its phases hand
        to the optimiser with ``requires_grad`` (a method that freezes by ``detach()`` inside
        forward). None: count those parameters (benchmarks/cost/engine.py)."""
        return None

    def state_numbers(self) -> Dict[str, int]:
        """Stored non-parameter state, in numbers, by kind (e.g. class statistics, usage
        counters). Default: the method's own buffers."""
        n = sum(b.numel() for name, b in self.named_buffers() if not name.startswith("backbone."))
        return {"buffers": n} if n else {}

    # -- helpers for subclasses ------------------------------------------------------------
    def get_query(self, x: Tensor, query: Optional[Tensor]) -> Tensor:
        """The frozen query feature: the cached one when given, else a fresh query pass."""
        return self.backbone.query(x) if query is None else query

    def method_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that belong to the method, not to the (frozen) backbone."""
        for name, p in self.named_parameters():
            if not name.startswith("backbone."):
                yield p

    def checkpoint_state(self) -> Dict[str, Tensor]:
        """state_dict without the frozen backbone weights (they are rebuilt from their source)."""
        state = self.state_dict()
        if not self.backbone.trainable:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def load_checkpoint_state(self, state: Dict[str, Tensor]) -> None:
        """Inverse of :meth:`checkpoint_state`; any other missing or unexpected key is an error."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if not self.backbone.trainable:
            missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the method: missing {missing}, unexpected {unexpected}")


def config_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}

"""Parity adapters for the JH-LEE-KR code bases: L2P (JH-LEE-KR/l2p-pytorch) and DualPrompt
(JH-LEE-KR/dualprompt-pytorch), run from a local checkout (``--ref``) under this project's timm
with the shims of :mod:`benchmarks.refcompare` (nothing of the references is copied here).

The reference side does what their ``main.py`` does for ``configs/<config>.py``: arguments parsed
by the config's own parser, the original (query) model and the prompted model from
``timm.create_model`` with the config's keywords, ``args.freeze`` applied, the lr scaled by
``batch_size / 256`` (``main.py``: ``unscale_lr`` is True by default, so the per-device batch),
``timm.optim.create_optimizer`` / ``create_scheduler`` (no scheduler for ``sched constant``);
the ViT weights come from our random ViT through their ``checkpoint_filter_fn`` (which gives the
prompt tokens the [CLS] positional embedding, as when they load the pretrained npz). The task
boundary runs their own ``engine.train_and_evaluate`` with ``train_one_epoch`` and
``evaluate_till_now`` stubbed, stopped when task ``t`` starts training (so the shared-pool copy
and the optimiser re-creation are theirs); the step is their ``engine.train_one_epoch`` over a
one-batch loader with a recording criterion; the transforms are their ``datasets.build_transform``
on a PIL image.
"""
from __future__ import annotations

import argparse
import importlib
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.parity import TASK, Adapter, Case, Side, Step, register_adapter
from benchmarks.refcompare import JHLEE_MODEL_KWARGS, quiet, timm06_shim


def cpu_shims() -> None:
    """Their loops call torch.cuda.synchronize() and some losses use .cuda() unconditionally."""
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
        torch.Tensor.cuda = lambda self, *a, **k: self.clone()


class _Stop(Exception):
    """Raised by the stubbed train_one_epoch when the wanted task starts training."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer


class Recorder(nn.Module):
    """CrossEntropyLoss that keeps what the reference's loop gave it (masked logits, loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Tuple[Tensor, Tensor]] = []

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = nn.functional.cross_entropy(logits, target)
        self.calls.append((logits.detach(), loss.detach()))
        return loss


class JHLeeSide(Side):
    """The reference side of a JH-LEE-KR code base (see the module docstring).

    ``names`` maps their trainable parameter names to ours; ``aux`` turns the model's output
    dict into the auxiliary loss term exactly as their ``train_one_epoch`` adds it."""

    def __init__(self, config: str, vit: nn.Module, num_classes: int, num_tasks: int, names: Dict[str, str],
                 extra: Sequence[str] = (), seed: int = 0) -> None:
        from timm.models import create_model

        cpu_shims()
        timm06_shim()
        self.names = names
        cfgmod = importlib.import_module(f"configs.{config}")
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="subparser_name")
        cfgmod.get_args_parser(sub.add_parser(config))
        args = parser.parse_args([config, *extra])
        args.device, args.distributed, args.nb_classes, args.pretrained = "cpu", False, num_classes, False
        args.num_tasks, args.print_freq, args.output_dir = num_tasks, 10 ** 9, ""
        # main.py: lr scaled by the (per-device, unscale_lr) batch size
        args.lr = args.lr * args.batch_size / 256.0
        self.args = args
        with warnings.catch_warnings():  # their builders re-register timm's names on purpose
            warnings.simplefilter("ignore")
            self.vit_module = importlib.import_module("vision_transformer")
            importlib.import_module("models")  # registers their ViT builders in timm
        self.engine = importlib.import_module("engine")
        self.datasets = importlib.import_module("datasets")
        common = dict(pretrained=False, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                      drop_block_rate=None)
        kwargs = {}
        for item in JHLEE_MODEL_KWARGS:
            kw, _, attr = item.partition(":")
            if hasattr(args, attr or kw):
                kwargs[kw] = getattr(args, attr or kw)
        torch.manual_seed(seed)
        self.original = create_model(args.model, **common)
        torch.manual_seed(seed)
        self.model = create_model(args.model, **common, **kwargs)
        for p in self.original.parameters():
            p.requires_grad = False
        for n, p in self.model.named_parameters():
            if n.startswith(tuple(args.freeze)):
                p.requires_grad = False
        self.init = {self.names.get(n, f"ref:{n}"): p.detach().clone()
                     for n, p in self.model.named_parameters() if p.requires_grad}
        for m in (self.original, self.model):
            sd = self.vit_module.checkpoint_filter_fn(vit.state_dict(), m)
            m.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")}, strict=False)
        self.per = num_classes // num_tasks
        self.class_mask = [list(range(t * self.per, (t + 1) * self.per)) for t in range(num_tasks)]
        self.optimizer = self._optimizer()
        self.task = 0

    def _optimizer(self):
        from timm.optim import create_optimizer

        return create_optimizer(self.args, self.model)

    def _own(self) -> Dict[str, nn.Parameter]:
        return {self.names.get(n, f"ref:{n}"): p for n, p in self.model.named_parameters() if p.requires_grad}

    def tensors(self) -> Dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self._own().items()}

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        own = self._own()
        with torch.no_grad():
            for n, v in values.items():
                if n in own and own[n].shape == v.shape:
                    own[n].copy_(v)

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        """Their train_and_evaluate up to the first training call of task ``t``."""
        eng = self.engine
        saved = eng.train_one_epoch, eng.evaluate_till_now

        def train_one_epoch(*a: Any, task_id: int = -1, optimizer: Any = None, **k: Any) -> Dict[str, float]:
            if task_id == t:
                raise _Stop(optimizer)
            return {}

        eng.train_one_epoch = train_one_epoch
        eng.evaluate_till_now = lambda *a, **k: {}
        for p in self.model.parameters():  # their shared-pool copy zeroes .grad, which exists after training
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        try:
            with quiet():
                eng.train_and_evaluate(self.model, self.model, self.original, nn.CrossEntropyLoss(), [{"train": []}] * self.args.num_tasks,
                                       self.optimizer, None, torch.device("cpu"), self.class_mask, self.args)
        except _Stop as stop:
            self.optimizer = stop.optimizer
        finally:
            eng.train_one_epoch, eng.evaluate_till_now = saved
        self.task = t

    def boundary_state(self) -> Dict[str, Tensor]:
        optimised = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return {f"trained:{self.names.get(n, 'ref:' + n)}": torch.tensor(float(id(p) in optimised and p.requires_grad))
                for n, p in self.model.named_parameters() if p.requires_grad}

    def _cls(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.original(x)["pre_logits"]

    def eval_logits(self, x: Tensor) -> Tensor:
        self.model.eval()
        self.original.eval()
        with torch.no_grad():
            return self.model(x, task_id=self.task, cls_features=self._cls(x))["logits"]

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        crit = Recorder()
        outs: List[Dict[str, Tensor]] = []
        hook = self.model.register_forward_hook(lambda mod, a, out: outs.append(out))
        try:
            with quiet():
                self.engine.train_one_epoch(self.model, self.original, crit, [(x, y)], self.optimizer, torch.device("cpu"),
                                            0, self.args.clip_grad, True, self.task, self.class_mask, self.args)
        finally:
            hook.remove()
        out = outs[-1]
        losses = {"ce": crit.calls[-1][1]}
        if self.args.pull_constraint and "reduce_sim" in out:  # engine.py: loss - coeff * reduce_sim
            losses["aux"] = (-self.args.pull_constraint_coeff * out["reduce_sim"]).detach()
        own = self._own()
        grads = {n: p.grad.detach().clone() for n, p in own.items() if p.grad is not None}
        return Step(out["logits"].detach(), losses, grads, self.tensors())

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        """main.py's optimiser and scheduler (none for ``sched constant``), stepped as
        ``train_and_evaluate`` steps it: ``lr_scheduler.step(epoch)`` after each epoch."""
        from timm.scheduler import create_scheduler

        opt = self._optimizer()
        sched = create_scheduler(self.args, opt)[0] if self.args.sched != "constant" else None
        per_param: Dict[int, List[float]] = {}
        for epoch in range(self.args.epochs):
            for g in opt.param_groups:
                for p in g["params"]:
                    per_param.setdefault(id(p), []).append(g["lr"])
            if sched:
                sched.step(epoch)
        return {n: torch.tensor(per_param[id(p)], dtype=torch.float64) for n, p in self._own().items() if id(p) in per_param}

    def steps_per_epoch(self, images: int) -> int:
        # datasets.py build_continual_dataloader: DataLoader(batch_size=args.batch_size), no drop_last
        return len(torch.utils.data.DataLoader(range(images), batch_size=self.args.batch_size))

    def transform(self, image: np.ndarray, train: bool, seed: int) -> Tensor:
        from PIL import Image

        tf = self.datasets.build_transform(train, self.args)
        torch.manual_seed(seed)
        return tf(Image.fromarray(image))


class JHLeeAdapter(Adapter):
    """Shared by L2P and DualPrompt: one case per config of the reference."""

    configs: Dict[str, str] = {}  # benchmark -> configs/<name>.py
    marker = ""  # a file only this repository has

    # the preset leaves the ports' batch-wise prompt vote off (documented); with it off, prompt
    # selection, and so everything downstream of it, may differ from the reference's
    vote_doc = ""
    batchwise: Tuple[str, ...] = ()  # benchmarks whose reference config has batchwise_prompt on

    def cases(self) -> List[Case]:
        """Per config: the preset as it is, and the preset with the reference's batch-wise vote
        (``method.batchwise_prompt=true``), where every number must agree."""
        out = []
        for b, c in self.configs.items():
            if b not in self.batchwise:  # the reference config has the vote off: one case
                out.append(Case("paper", b, f"configs/{c}.py", options={"config": c}))
                continue
            out.append(Case("paper", b, f"configs/{c}.py", options={"config": c},
                            deviations={k: self.vote_doc for k in ("logits/*", "loss/*", "grad", "step")}))
            out.append(Case("paper", b, f"configs/{c}.py", overrides={"method": {"batchwise_prompt": True}},
                            options={"config": c}))
        return out

    def check_ref(self, ref_dir: str) -> Optional[str]:
        import os

        if not os.path.exists(os.path.join(ref_dir, self.marker)):
            return f"--ref {ref_dir} has no {self.marker}; pass a checkout of {self.repo}"
        return None

    def names(self, ours: Side) -> Dict[str, str]:
        raise NotImplementedError

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        return JHLeeSide(case.options["config"], vit, ours.num_classes, ours.cfg.benchmark.num_tasks,  # type: ignore[attr-defined]
                         self.names(ours), seed=seed)


@register_adapter
class L2PAdapter(JHLeeAdapter):
    method = "l2p"
    repo = "JH-LEE-KR/l2p-pytorch"
    configs = {"cifar100": "cifar100_l2p"}
    batchwise = ("cifar100",)
    marker = "configs/cifar100_l2p.py"
    vote_doc = "docs/methods-l2p-dualprompt.md#l2p-methodvariant-l2p-default (batchwise_prompt off)"

    def names(self, ours: Side) -> Dict[str, str]:
        return {"prompt.prompt": "prompts.0", "prompt.prompt_key": "keys.0", "head.weight": "head.weight",
                "head.bias": "head.bias"}

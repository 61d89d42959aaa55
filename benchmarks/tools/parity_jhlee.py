"""Parity adapters for the JH-LEE-KR code bases: L2P (JH-LEE-KR/l2p-pytorch) and DualPrompt
(JH-LEE-KR/dualprompt-pytorch), run from a local checkout (``--ref``) under this project's timm
with the shims of :mod:`benchmarks.tools.refcompare` (nothing of the references is copied here).

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

import importlib
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.tools.parity import Adapter, Case, Side, Step, register_adapter
from benchmarks.tools.refcompare import JHLEE_MODEL_KWARGS, jhlee_args, quiet, timm06_shim


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
        # copies: HiDe's loop adds its regulariser in place (loss += ...) to the returned tensor
        self.calls.append((logits.detach().clone(), loss.detach().clone()))
        return loss


class JHLeeSide(Side):
    """The reference side of a JH-LEE-KR code base (see the module docstring).

    ``names`` maps their trainable parameter names to ours: a name, or ``(name, to_ours,
    to_theirs)`` where the layouts differ (two functions that reshape a tensor each way)."""

    vit_modules: Tuple[str, ...] = ("vision_transformer", "models")  # the first has checkpoint_filter_fn
    engine_name = "engine"

    def __init__(self, config: str, vit: nn.Module, num_classes: int, num_tasks: int, names: Dict[str, Any],
                 extra: Sequence[str] = (), seed: int = 0) -> None:
        from timm.models import create_model

        cpu_shims()
        timm06_shim()
        self.names = {k: v if isinstance(v, tuple) else (v, None, None) for k, v in names.items()}
        args = jhlee_args(config, extra)  # their main.py's parser, set for one CPU process
        args.nb_classes, args.num_tasks, args.output_dir = num_classes, num_tasks, ""
        # main.py: lr scaled by the (per-device, unscale_lr) batch size
        args.lr = args.lr * args.batch_size / 256.0
        self.args = args
        with warnings.catch_warnings():  # their builders re-register timm's names on purpose
            warnings.simplefilter("ignore")
            mods = [importlib.import_module(m) for m in self.vit_modules]  # registers their ViT builders
            self.vit_module = mods[0]
        self.engine = importlib.import_module(self.engine_name)
        self.datasets = importlib.import_module("datasets")
        common = dict(pretrained=False, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                      drop_block_rate=None)
        kwargs = {}
        for item in JHLEE_MODEL_KWARGS:
            kw, _, attr = item.partition(":")
            if hasattr(args, attr or kw):
                kwargs[kw] = getattr(args, attr or kw)
        torch.manual_seed(seed)
        self.original = create_model(getattr(args, "original_model", args.model), **common, **self.original_kwargs())
        torch.manual_seed(seed)
        self.model = create_model(args.model, **common, **kwargs)
        self.init = self.original_init()
        for p in self.original.parameters():
            p.requires_grad = False
        for n, p in self.model.named_parameters():
            if n.startswith(tuple(args.freeze)):
                p.requires_grad = False
        self.init.update(self._ours({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}))
        for m in (self.original, self.model):
            sd = self.vit_module.checkpoint_filter_fn(vit.state_dict(), m)
            m.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")}, strict=False)
        self.per = num_classes // num_tasks
        self.class_mask = [list(range(t * self.per, (t + 1) * self.per)) for t in range(num_tasks)]
        self.optimizer = self._optimizer()
        self.task = 0

    def original_kwargs(self) -> Dict[str, Any]:
        """Extra create_model keywords of the original (query) model."""
        return {}

    def original_init(self) -> Dict[str, Tensor]:
        """Trainable tensors of the original model as built (HiDe's TII network), our names."""
        return {}

    def _optimizer(self):
        from timm.optim import create_optimizer

        return create_optimizer(self.args, self.model)

    def _ours(self, theirs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Their tensors under our names and in our layout."""
        out = {}
        for n, v in theirs.items():
            name, to_ours, _ = self.names.get(n, (f"ref:{n}", None, None))
            out[name] = to_ours(v) if to_ours else v
        return out

    def _name(self, theirs: str) -> str:
        return self.names.get(theirs, (f"ref:{theirs}",))[0]

    def _trainable(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def tensors(self) -> Dict[str, Tensor]:
        return self._ours({n: p.detach().clone() for n, p in self._trainable().items()})

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self._trainable().items():
                name, _, to_theirs = self.names.get(n, (f"ref:{n}", None, None))
                if name in values:
                    v = to_theirs(values[name]) if to_theirs else values[name]
                    if v.shape == p.shape:
                        p.copy_(v)

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
                self.run_train_and_evaluate()
        except _Stop as stop:
            self.optimizer = stop.optimizer
        finally:
            eng.train_one_epoch, eng.evaluate_till_now = saved
        self.task = t

    def run_train_and_evaluate(self) -> None:
        self.engine.train_and_evaluate(self.model, self.model, self.original, nn.CrossEntropyLoss(),
                                       [{"train": []}] * self.args.num_tasks, self.optimizer, None, torch.device("cpu"),
                                       self.class_mask, self.args)

    def one_epoch(self, crit: nn.Module, x: Tensor, y: Tensor) -> None:
        self.engine.train_one_epoch(self.model, self.original, crit, [(x, y)], self.optimizer, torch.device("cpu"),
                                    0, self.args.clip_grad, True, self.task, self.class_mask, self.args)

    def boundary_state(self) -> Dict[str, Tensor]:
        optimised = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return {f"trained:{self._name(n)}": torch.tensor(float(id(p) in optimised)) for n, p in self._trainable().items()}

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
                self.one_epoch(crit, x, y)
        finally:
            hook.remove()
        out = outs[-1]
        losses = {"ce": crit.calls[-1][1]}
        losses.update(self.aux_losses(out))
        grads = self._ours({n: p.grad.detach().clone() for n, p in self._trainable().items() if p.grad is not None})
        return Step(out["logits"].detach(), losses, grads, self.tensors())

    def aux_losses(self, out: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The terms their train_one_epoch adds to the CE, from the model's output dict."""
        if getattr(self.args, "pull_constraint", False) and "reduce_sim" in out:  # loss - coeff * reduce_sim
            return {"aux": (-self.args.pull_constraint_coeff * out["reduce_sim"]).detach()}
        return {}

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
        return {self._name(n): torch.tensor(per_param[id(p)], dtype=torch.float64)
                for n, p in self._trainable().items() if id(p) in per_param}

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

    # documented differences of the preset from the reference config (options that exist, default
    # off): per benchmark, our overrides that reproduce the reference, and the docs paragraph
    ref_options: Dict[str, Dict[str, Any]] = {}
    doc = ""

    def cases(self) -> List[Case]:
        """Per config: the preset as it is (where it differs by a documented option, the checks
        downstream of prompt selection are DEVIATIONs linking ``doc``), and the preset with the
        options set as the reference has them, where every number must agree."""
        out = []
        for b, c in self.configs.items():
            opts = self.ref_options.get(b, {})
            devs = {k: self.doc for k in ("logits/*", "loss/*", "grad", "step")} if opts else {}
            out.append(Case("paper", b, f"configs/{c}.py", options={"config": c}, deviations=devs))
            if opts:
                out.append(Case("paper", b, f"configs/{c}.py", overrides={"method": dict(opts)}, options={"config": c}))
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
    marker = "configs/cifar100_l2p.py"
    ref_options = {"cifar100": {"batchwise_prompt": True}}
    doc = "docs/methods-l2p-dualprompt.md#l2p-methodvariant-l2p-default (batchwise_prompt off)"

    def names(self, ours: Side) -> Dict[str, str]:
        return {"prompt.prompt": "prompts.0", "prompt.prompt_key": "keys.0", "head.weight": "head.weight",
                "head.bias": "head.bias"}


def _e_to_ours(v: Tensor) -> Tensor:
    """(layers, 2, pool, L, H, d_h) -> ours (layers, pool, 2L, D): rows [0, L) keys, [L, 2L) values."""
    n, two, m, length, h, dh = v.shape
    return v.permute(0, 2, 1, 3, 4, 5).reshape(n, m, two * length, h * dh)


def _g_to_ours(v: Tensor) -> Tensor:
    """(layers, 2, L, H, d_h) -> ours (layers, 2L, D)."""
    n, two, length, h, dh = v.shape
    return v.reshape(n, two * length, h * dh)


@register_adapter
class DualPromptAdapter(JHLeeAdapter):
    method = "dualprompt"
    repo = "JH-LEE-KR/dualprompt-pytorch"
    configs = {"cifar100": "cifar100_dualprompt", "imagenet_r": "imr_dualprompt"}
    marker = "configs/imr_dualprompt.py"
    # the port's E-prompt reshape (dualprompt-pytorch#8) and, on CIFAR, its batch-wise vote
    ref_options = {"cifar100": {"batchwise_prompt": True, "reshape_quirk": True}, "imagenet_r": {"reshape_quirk": True}}
    doc = "docs/methods-l2p-dualprompt.md#dualprompt-methodvariant-dualprompt-default (reshape_quirk, batchwise_prompt off)"

    def names(self, ours: Side) -> Dict[str, Any]:
        own = ours.init  # our layouts, to invert the mapping
        e_shape, g_shape = own["e_prompt"].shape, own["g_prompt"].shape

        def e_to_theirs(v: Tensor) -> Tensor:
            n, m, rows, d = v.shape
            h = self.heads
            return v.reshape(n, m, 2, rows // 2, h, d // h).permute(0, 2, 1, 3, 4, 5).contiguous()

        def g_to_theirs(v: Tensor) -> Tensor:
            n, rows, d = v.shape
            return v.reshape(n, 2, rows // 2, self.heads, d // self.heads).contiguous()

        assert e_shape[2] % 2 == 0 and g_shape[1] % 2 == 0
        return {"e_prompt.prompt": ("e_prompt", _e_to_ours, e_to_theirs),
                "e_prompt.prompt_key": ("keys", lambda v: v.unsqueeze(0), lambda v: v[0]),
                "g_prompt": ("g_prompt", _g_to_ours, g_to_theirs),
                "head.weight": "head.weight", "head.bias": "head.bias"}

    heads = 12  # ViT-B/16

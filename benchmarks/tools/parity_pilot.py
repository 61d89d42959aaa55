"""Shared reference-side plumbing of the parity adapters of the first-session methods (RanPAC,
APER, EASE, SLCA: :mod:`benchmarks.tools.parity_ranpac`, ``parity_aper``, ``parity_ease``,
``parity_slca``), whose code bases all follow PILOT's / RevisitingCIL's layout: a ``Learner`` with
``incremental_train`` / ``_init_train`` (or ``_run``), ``utils/data.py`` transforms, a
``DataManager`` and ``torch.utils.data.DataLoader`` looked up in the learner's module.

* :func:`cpu_shims`, :class:`patched_create_model`: their code on a CPU, with our random ViT as
  the "pretrained" one;
* :class:`OneBatchData`: a stand-in for their ``DataManager`` serving the harness's one batch;
* :class:`OwnTensors`: a side over a name -> parameter mapping (``own``): loading tensors,
  gradients (SLCA's own side uses it too);
* :class:`PilotRefSide`: their learner built with :class:`OneBatchData`, the recorded optimiser's
  lr per epoch, their loader's steps, their eval forward, their transforms;
* :class:`StopAtTraining`: what a stubbed training loop raises where the boundary ends;
* :class:`PilotAdapter`: the checkout check, our config, their JSON arguments and task sizes.

The pieces of our side these adapters share with every adapter (``our_lrs``,
``captured_forward``) are in :mod:`benchmarks.tools.parity`.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import types
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.tools.parity import Adapter, Case, Side

ORDER_SEED = 0  # BatchContext.generator: what our end_task shuffles its features with in parity
STEP_SEED = 1234  # the RNG state both sides' training steps start from (adapter dropout)


class StopAtTraining(Exception):
    """Raised by a stubbed training loop: the boundary ends where a task's training starts."""


def cpu_shims() -> None:
    """Their code moves tensors with ``.cuda()`` / ``.to(device='cuda')`` unconditionally; on a
    CPU-only machine both stay on the CPU. Also timm 0.6's ``timm.models.layers.helpers`` and
    ``easydict`` (a dict with attribute access), which their PETL modules import."""
    import timm.layers.helpers as helpers

    sys.modules.setdefault("timm.models.layers.helpers", helpers)
    if "easydict" not in sys.modules:
        class EasyDict(dict):
            __getattr__ = dict.__getitem__

        sys.modules["easydict"] = types.SimpleNamespace(EasyDict=EasyDict)  # type: ignore[assignment]
    warnings.filterwarnings("ignore", category=FutureWarning)
    if torch.cuda.is_available() or getattr(torch.Tensor.to, "_cpu_shim", False):
        return
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    orig_to = torch.Tensor.to

    def to(self, *a, **k):
        if k.get("device") is not None and str(k["device"]).startswith("cuda"):
            k["device"] = "cpu"
        a = tuple("cpu" if isinstance(v, str) and v.startswith("cuda") else v for v in a)
        return orig_to(self, *a, **k)

    to._cpu_shim = True  # type: ignore[attr-defined]
    torch.Tensor.to = to  # type: ignore[assignment]



class patched_create_model:
    """``timm.create_model`` returning our random ViT while their builders run (their adapter
    builders load ``timm.create_model(name, pretrained=True)``'s state dict into their model)."""

    def __init__(self, vit: nn.Module) -> None:
        self.vit = vit

    def __enter__(self) -> None:
        import timm

        self.orig = timm.create_model
        timm.create_model = self.create  # type: ignore[assignment]

    def create(self, name: str, pretrained: bool = False, **kw: Any) -> nn.Module:
        if not name.endswith("_ssf"):
            return copy.deepcopy(self.vit)  # their own copy (APER keeps it as the frozen branch)
        # their SSF ViT (registered by petl/vision_transformer_ssf.py, timm names) with our weights
        from benchmarks.tools.refcompare import load_vit_weights, timm06_shim

        timm06_shim()
        import importlib

        import timm.models.helpers as helpers

        try:  # RanPAC's petl/ or RevisitingCIL's convs/
            S = importlib.import_module("petl.vision_transformer_ssf")
        except ModuleNotFoundError:
            S = importlib.import_module("convs.vision_transformer_ssf")

        S.resolve_pretrained_cfg, S.build_model_with_cfg = helpers.resolve_pretrained_cfg, helpers.build_model_with_cfg
        model = getattr(S, name)(pretrained=False, **kw)
        load_vit_weights(model, self.vit)
        return model

    def __exit__(self, *exc: Any) -> None:
        import timm

        timm.create_model = self.orig  # type: ignore[assignment]



class OneBatchData:
    """Stand-in for their ``DataManager``: every dataset is the one batch the harness gives, in
    the order our ``end_task`` reads it (the order its ``BatchContext.generator`` gives)."""

    def __init__(self, total: int, sizes: List[int]) -> None:
        self.total, self.sizes = total, sizes
        self.batch: Optional[Tuple[Tensor, Tensor]] = None

    def get_total_classnum(self) -> int:
        return self.total

    def get_task_size(self, t: int) -> int:
        return self.sizes[t]

    def get_dataset(self, *a: Any, **k: Any) -> "OneBatchData":
        return self

    @property
    def labels(self) -> np.ndarray:
        """``train_dataset.labels`` (APER's ``replace_fc`` takes its class list from it)."""
        return self.batch[1].numpy() if self.batch is not None else np.zeros(0, dtype=np.int64)

    def loader(self, *a: Any, **k: Any) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """Their ``DataLoader(...)``: one batch, rows in our order."""
        if self.batch is None:
            return []
        x, y = self.batch
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(ORDER_SEED))
        return [(perm, x[perm], y[perm])]


# --- the reference side ----------------------------------------------------------------------

class OwnTensors:
    """A side whose compared tensors are :meth:`own` (our name -> the parameter): loading values
    into them, and their gradients."""

    def own(self) -> Dict[str, nn.Parameter]:
        raise NotImplementedError

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        own = self.own()
        with torch.no_grad():
            for n, v in values.items():
                if n in own and own[n].shape == v.shape:
                    own[n].copy_(v)

    def grads(self) -> Dict[str, Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.own().items() if p.grad is not None}


class PilotRefSide(OwnTensors, Side):
    """A reference side over :meth:`own`, with ``lrn`` (their learner), ``recorded`` (what their
    stubbed training loop got: ``optimizer``, ``scheduler``) and ``train_tf`` / ``test_tf`` (their
    transform lists) set by the subclass."""

    lrn: Any
    data: Any
    recorded: Dict[str, Any]
    train_tf: List[Any]
    test_tf: List[Any]

    def build_learner(self, module: str, args: Dict[str, Any], vit: nn.Module, num_classes: int,
                      sizes: List[int]) -> Tuple[Any, Any]:
        """Their ``<module>.Learner(args)``, built with our ViT as the pretrained one, and the
        module; its ``DataLoader`` serves ``self.data`` (a :class:`OneBatchData`): the one batch,
        in our order."""
        import importlib

        from benchmarks.tools.refcompare import quiet

        cpu_shims()
        mod = importlib.import_module(module)
        self.data = OneBatchData(num_classes, sizes)
        mod.DataLoader = self.data.loader
        with patched_create_model(vit), quiet():
            lrn = mod.Learner(args)
        return mod, lrn

    def eval_logits(self, x: Tensor) -> Tensor:
        net = self.lrn._network
        net.eval()
        return net(x)["logits"]

    def recorded_lrs(self, epochs: int) -> Dict[str, Tensor]:
        """The recorded optimiser's lr of every mapped tensor, epoch by epoch, with the recorded
        scheduler stepped once per epoch, after the epoch's iterations (as their training loops)."""
        opt, sched = self.recorded["optimizer"], self.recorded["scheduler"]
        names = {id(p): n for n, p in self.own().items()}
        per: Dict[str, List[float]] = {}
        for _ in range(epochs):
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in names:
                        per.setdefault(names[id(p)], []).append(g["lr"])
            sched.step()
        return {n: torch.tensor(v, dtype=torch.float64) for n, v in per.items()}

    @staticmethod
    def loader_steps(images: int, batch_size: int) -> int:
        """Their training ``DataLoader(..., batch_size, shuffle=True)``: no drop_last."""
        return len(torch.utils.data.DataLoader(range(images), batch_size=batch_size, shuffle=True))

    def transform(self, image: np.ndarray, train: bool, seed: int) -> Tensor:
        from PIL import Image
        from torchvision import transforms

        tf = transforms.Compose(self.train_tf if train else self.test_tf)
        torch.manual_seed(seed)
        return tf(Image.fromarray(image))


class PilotAdapter(Adapter):
    """An adapter whose checkout is recognised by ``ref_file`` and whose reference reads its
    arguments from a JSON file of the checkout (``case.options["json"]``)."""

    ref_file = ""  # a file every checkout of :attr:`repo` has (relative path)

    def check_ref(self, ref_dir: str) -> Optional[str]:
        if not os.path.exists(os.path.join(ref_dir, self.ref_file)):
            return f"--ref {ref_dir} has no {self.ref_file}; pass a checkout of {self.repo}"
        return None

    def config(self, case: Case) -> Any:
        from benchmarks.tables.cost_table import resolve_method_config

        cfg, _ = resolve_method_config(self.method, case.benchmark, case.preset, case.overrides)
        return cfg

    @staticmethod
    def json_args(ref_dir: str, case: Case) -> Dict[str, Any]:
        """Their JSON arguments, on the CPU."""
        with open(os.path.join(ref_dir, case.options["json"])) as f:
            args: Dict[str, Any] = json.load(f)
        args["device"] = ["cpu"]
        return args

    @staticmethod
    def task_sizes(args: Dict[str, Any], ours: Side) -> List[int]:
        n_tasks = ours.cfg.benchmark.num_tasks  # type: ignore[attr-defined]
        return [args["init_cls"]] + [args["increment"]] * (n_tasks - 1)


def their_data() -> Any:
    """Their ``utils/data.py`` (transforms), imported with :func:`cpu_shims` in place."""
    cpu_shims()
    import utils.data as D  # type: ignore

    return D

"""Parity adapter for OVOR (jpmorganchase/ovor), run from a local checkout (``--ref``); nothing of
the reference is copied here.

The reference side builds their ``models.zoo.ViTZoo(prompt_flag='oneprompt')`` with
``--prompt_param 10 40 10``; their constructor loads ``timm.models.vit_base_patch16_224(pretrained=True)``
into their BLIP-style ViT, which is pointed at our random ViT for the run. Their learner
(``learners.default.NormalNN``) needs CUDA and ``nn.DataParallel`` in its constructor, so its
methods run unbound on a stand-in object holding what they read (model, optimiser, scheduler,
criterion, NPOS, class range, a no-op logger): ``init_optimizer`` (Adam + ``CosineSchedule`` over
all epochs), ``_train_one_epoch`` (the step), and at the task boundary the VOR epochs of task 0
(``_train_one_epoch_ood`` with ``_get_ood_samples``) on the boundary batch, then their boundary
(``process_task_count``, the class range, a fresh optimiser). faiss (not installed here) is
replaced by an exact numpy ``IndexFlatL2``; NPOS's offsets are set to the ones our side draws
(same generator seed) so that both synthesise the same outliers. Transforms are their loaders'
``get_transform`` on a PIL image.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.tools.parity import Adapter, Case, Side, Step, register_adapter
from benchmarks.tools.refcompare import quiet

G_LAYERS, E_LAYERS = (0, 1), (2, 3, 4)


def faiss_stub() -> None:
    """An exact ``faiss.IndexFlatL2`` (squared L2, ascending) for their ``learners/ood.py``."""
    if "faiss" in sys.modules:
        return

    class IndexFlatL2:
        def __init__(self, d: int) -> None:
            self.xb = np.zeros((0, d), dtype=np.float64)

        def add(self, x: np.ndarray) -> None:
            self.xb = np.concatenate([self.xb, np.asarray(x, dtype=np.float64)])

        def reset(self) -> None:
            self.xb = self.xb[:0]

        def search(self, x: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
            d = ((np.asarray(x, dtype=np.float64)[:, None, :] - self.xb[None]) ** 2).sum(-1)
            idx = np.argsort(d, axis=1, kind="stable")[:, :k]
            dist = np.take_along_axis(d, idx, 1).astype(np.float32)
            if idx.shape[1] < k:  # faiss pads missing neighbours with the largest float and label -1
                pad = k - idx.shape[1]
                dist = np.concatenate([dist, np.full((len(dist), pad), np.finfo(np.float32).max, np.float32)], 1)
                idx = np.concatenate([idx, np.full((len(idx), pad), -1)], 1)
            return dist, idx

    sys.modules["faiss"] = types.SimpleNamespace(IndexFlatL2=IndexFlatL2)


class _Meter:
    """Their logger's meters (reset / add), ignored."""

    def reset(self) -> None: ...

    def add(self, *a: Any, **k: Any) -> None: ...

    def __str__(self) -> str:
        return ""


class _Logger:
    step = 0

    def __getattr__(self, name: str) -> Any:
        return _Meter()

    def get_memory_usage(self) -> int:
        return 0


class OVORSide(Side):
    """Their OnePrompt model and NormalNN loop (see the module docstring)."""

    boundary_trained = ("head.weight", "head.bias")  # the VOR epochs of task 0 train the head

    def __init__(self, ref_dir: str, vit: nn.Module, ours: Any, dataset: str, epochs: List[int]) -> None:
        import timm.models

        if not torch.cuda.is_available():  # their loops call .cuda() on tensors and modules
            torch.Tensor.cuda = lambda self, *a, **k: self.clone()
        faiss_stub()
        if ref_dir not in sys.path:
            sys.path.insert(0, ref_dir)
        for name in [m for m in sys.modules if m == "models" or m.startswith(("models.", "learners", "utils", "dataloaders"))]:
            del sys.modules[name]  # another reference's packages of the same names
        with quiet():
            zoo = importlib.import_module("models.zoo")
            self.default = importlib.import_module("learners.default")
            ood = importlib.import_module("learners.ood")
            self.sched_mod = importlib.import_module("utils.schedulers")
            self.data_mod = importlib.import_module("dataloaders.dataset")
        state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
        d = state["cls_token"].shape[-1]
        state["head.weight"], state["head.bias"] = torch.zeros(1, d), torch.zeros(1)  # they delete these

        class _Pretrained:  # what their constructor loads: our random ViT's weights
            def state_dict(self) -> Dict[str, Tensor]:
                return dict(state)

        saved = timm.models.vit_base_patch16_224
        timm.models.vit_base_patch16_224 = lambda pretrained=False, **k: _Pretrained()
        try:
            self.num_classes = ours.num_classes
            self.model = zoo.ViTZoo(num_classes=self.num_classes, pt=True, prompt_flag="oneprompt",
                                    prompt_param=[ours.cfg.benchmark.num_tasks, [10, 40, 10]])
        finally:
            timm.models.vit_base_patch16_224 = saved
        self.model.feat.requires_grad_(False)  # only prompt + head reach their optimiser anyway
        self.init = self.tensors()
        per = self.num_classes // ours.cfg.benchmark.num_tasks
        cfg = ours.cfg.method
        s = types.SimpleNamespace()
        s.model, s.epochs, s.bsz = self.model, list(epochs), 128
        s.opt_cfg = {"optimizer": "Adam", "lr": 0.001, "momentum": 0.9, "weight_decay": 0, "scheduler": "cosine"}
        s.criterion, s.logger = nn.CrossEntropyLoss(), _Logger()
        s.subset_start, s.subset_end = 0, per
        s.ood = ood.NPOS({"K": cfg.knn_k, "sample_from": cfg.sample_from, "select": cfg.select, "cov": cfg.cov,
                          "num_per_class": cfg.per_class, "id_bsz": cfg.vor_batch_size, "thres_id": cfg.thres_id,
                          "thres_ood": cfg.thres_ood, "lmda": cfg.lmda, "huber": cfg.vor_loss == "huber"})
        s._get_learnable_params = lambda: list(self.model.prompt.parameters()) + list(self.model.last.parameters())
        s._get_ood_samples = lambda loader: self.default.NormalNN._get_ood_samples(s, loader)
        self.s, self.per, self.dataset = s, per, dataset
        self.default.NormalNN.init_optimizer(s)

    # -- tensors under our names --------------------------------------------------------------
    def _parts(self) -> Dict[str, List[nn.Parameter]]:
        p = self.model.prompt
        return {"g_prompt": [getattr(p, f"g_p_{l}") for l in G_LAYERS], "e_prompt": [getattr(p, f"e_p_{l}") for l in E_LAYERS]}

    def tensors(self) -> Dict[str, Tensor]:
        out = {n: torch.stack([t.detach() for t in ts]).clone() for n, ts in self._parts().items()}
        out["head.weight"], out["head.bias"] = self.model.last.weight.detach().clone(), self.model.last.bias.detach().clone()
        return out

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, ts in self._parts().items():
                if n in values:
                    for i, t in enumerate(ts):
                        t.copy_(values[n][i])
            if "head.weight" in values:
                self.model.last.weight.copy_(values["head.weight"])
                self.model.last.bias.copy_(values["head.bias"])

    # -- the loop ---------------------------------------------------------------------------------
    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        s = self.s
        if t > 0 and prev is not None and s.epochs[2] > 0:
            # the VOR epochs that end task t-1 (NormalNN.train's third loop), on the boundary batch;
            # the scheduler stands where the regular epochs left it: stepped before every epoch > 0
            for _ in range(1, s.epochs[0] + s.epochs[1]):
                s.scheduler.step()
            offsets = torch.randn(s.ood.sample_from, self.model.last.in_features,
                                  generator=torch.Generator().manual_seed(0))  # our BatchContext's generator
            s.ood.dis = types.SimpleNamespace(rsample=lambda shape: offsets[: shape[0]])
            for e in range(s.epochs[2]):
                with quiet():
                    self.default.NormalNN._train_one_epoch_ood(s, [(prev[0], prev[1], None)], s.epochs[0] + s.epochs[1] + e)
        if t > 0:
            self.model.prompt.process_task_count()  # trainer.py Trainer.run
        s.subset_start, s.subset_end = t * self.per, (t + 1) * self.per
        self.default.NormalNN.init_optimizer(s)  # NormalNN.train: a fresh optimiser every task

    def boundary_state(self) -> Dict[str, Tensor]:
        trained = {id(p) for g in self.s.optimizer.param_groups for p in g["params"]}
        out = {}
        for n, ts in self._parts().items():
            out[f"trained:{n}"] = torch.tensor(float(all(id(p) in trained for p in ts)))
        for n, p in (("head.weight", self.model.last.weight), ("head.bias", self.model.last.bias)):
            out[f"trained:{n}"] = torch.tensor(float(id(p) in trained))
        return out

    def eval_logits(self, x: Tensor) -> Tensor:
        self.model.eval()
        with torch.no_grad():
            return self.model(x=x)

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        s = self.s
        seen: List[Tensor] = []
        losses: List[Tensor] = []
        hook = self.model.last.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone()))
        criterion = s.criterion

        def recording(logits: Tensor, target: Tensor) -> Tensor:
            loss = criterion(logits, target)
            losses.append(loss.detach())
            return loss

        s.criterion = recording
        self.model.train()
        try:
            self.default.NormalNN._train_one_epoch(s, [(x, y, None)], 0)
        finally:
            hook.remove()
            s.criterion = criterion
        grads = {}
        for n, ts in self._parts().items():
            if all(t.grad is not None for t in ts):
                grads[n] = torch.stack([t.grad.detach() for t in ts]).clone()
        for n, p in (("head.weight", self.model.last.weight), ("head.bias", self.model.last.bias)):
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()
        return Step(seen[-1], {"ce": losses[-1]}, grads, self.tensors())

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        # NormalNN.train: scheduler.step() before every epoch e > 0 of the regular loop
        s = self.s
        self.default.NormalNN.init_optimizer(s)
        vals = []
        for e in range(s.epochs[0], s.epochs[0] + s.epochs[1]):
            if e > 0:
                s.scheduler.step()
            vals.append(s.optimizer.param_groups[0]["lr"])
        self.default.NormalNN.init_optimizer(s)
        v = torch.tensor(vals, dtype=torch.float64)
        return {n: v for n in ("g_prompt", "e_prompt", "head.weight", "head.bias")}

    def steps_per_epoch(self, images: int) -> int:
        return len(torch.utils.data.DataLoader(range(images), batch_size=self.s.bsz))  # drop_last False

    def transform(self, image: np.ndarray, train: bool, seed: int) -> Tensor:
        from PIL import Image

        loader = {"cifar100": "CIFAR100Loader", "imagenet_r": "ImagenetRLoader"}[self.dataset]
        tf = getattr(self.data_mod, loader).get_transform(None, "train" if train else "test")
        torch.manual_seed(seed)
        return tf(Image.fromarray(image))


@register_adapter
class OVORAdapter(Adapter):
    method = "ovor"
    repo = "jpmorganchase/ovor"
    # none: the transforms agree within the harness's 3/255 (PIL against tensor resizing)
    deviations: Dict[str, str] = {}

    def cases(self) -> List[Case]:
        # knn_k = 2 on both sides: the compared boundary batch has 2 images, fewer than the
        # reference's K = 50, where faiss pads with "infinite" distances (every candidate ties)
        # and ours caps K at the number of ID features (docs/methods-ovor-norga.md)
        k = {"method": {"knn_k": 2}}
        return [Case("paper", "cifar100", "experiments/cifar-100.sh (--prompt_param 10 40 10 --epochs 0 16 4)",
                     overrides=k, options={"epochs": [0, 16, 4]}),
                Case("paper", "imagenet_r", "experiments/imagenet-r.sh (--prompt_param 10 40 10 --epochs 0 40 10)",
                     overrides=k, options={"epochs": [0, 40, 10]})]

    def check_ref(self, ref_dir: str) -> Optional[str]:
        import os

        if not os.path.isfile(os.path.join(ref_dir, "learners", "ood.py")):
            return f"{ref_dir} is not a checkout of {self.repo} (no learners/ood.py)"
        return None

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        return OVORSide(ref_dir, vit, ours, case.benchmark, case.options["epochs"])

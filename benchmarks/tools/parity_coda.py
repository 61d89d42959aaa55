"""Parity adapters for the GT-RIPL learner code base (GT-RIPL/CODA-Prompt) and its descendants.

CODA-Prompt's repository holds CODA-P and its reimplementations of L2P (L2P++ / Deep L2P++) and
DualPrompt, which the suite's ``coda`` presets follow; SMoPE and VQ-Prompt build on the same
learner code (``learners/prompt.py``, ``learners/default.py``, ``models/zoo.py``), so
:class:`LearnerSide` serves them too (``benchmarks/tools/parity_smope.py``).

The reference side does what ``trainer.py`` does: the learner built from the config dict that
``trainer.py`` assembles from ``configs/<yaml>`` and the ``--prompt_param`` of
``experiments/<benchmark>.sh``; ``models/zoo.py`` downloads timm's pretrained ViT-B/16 to
initialise its own, which gets a randomly built one here and our random weights right after
(:func:`benchmarks.tools.refcompare.load_vit_weights`). Task boundary (``trainer.py`` ``train`` and
``learn_batch``): ``task_id``, ``add_valid_output_dim``, ``process_task_count`` from the second
task on, a fresh optimiser (``reset_optimizer``), after the previous task ``last_valid_out_dim``
and ``task_count``. Step: ``learner.update_model`` with its criterion recorded. Schedule: its
``init_optimizer`` and the epoch loop of ``learn_batch`` (``if epoch > 0: scheduler.step()``).
Loader: ``DataLoader(..., drop_last=True)`` of ``trainer.py``. Transforms:
``dataloaders.utils.get_transform`` on a PIL image, as the datasets apply it.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.tools.parity import Adapter, Case, Side, Step, register_adapter
from benchmarks.tools.parity_jhlee import cpu_shims
from benchmarks.tools.refcompare import load_vit_weights, quiet

Names = Callable[[Dict[str, Tensor]], Dict[str, Tensor]]


def random_timm_vit() -> None:
    """``models/zoo.py`` calls timm's ``vit_base_patch16_224(pretrained=True)`` for its weights:
    build it without downloading (our random weights are loaded over it right after)."""
    import timm.models

    if not getattr(timm.models, "_parity_random", False):
        builder = timm.models.vit_base_patch16_224
        timm.models.vit_base_patch16_224 = lambda pretrained=False, **kw: builder(pretrained=False, **kw)
        timm.models._parity_random = True


class LearnerSide(Side):
    """A GT-RIPL-style learner (see the module docstring).

    ``to_ours`` maps their trainable tensors (``prompt.<name>``, ``last.weight`` ...) to ours,
    ``to_theirs`` the inverse (it may return a subset)."""

    def __init__(self, learner: str, prompt_param: List[float], config_yaml: str, dataset: str, vit: nn.Module,
                 num_classes: int, num_tasks: int, to_ours: Names, to_theirs: Names, seed: int = 0,
                 extra_config: Optional[Dict[str, Any]] = None, module: str = "learners.prompt") -> None:
        import yaml

        cpu_shims()
        random_timm_vit()
        self.to_ours_fn, self.to_theirs_fn = to_ours, to_theirs
        self.dataset = dataset
        self.utils = importlib.import_module("dataloaders.utils")
        learners = importlib.import_module(module)
        with open(config_yaml) as f:
            c = yaml.safe_load(f)
        self.per = num_classes // num_tasks
        tasks = [list(range(t * self.per, (t + 1) * self.per)) for t in range(num_tasks)]
        # trainer.py's learner_config (the values its argument parser and configs/<yaml> give)
        config = {"num_classes": num_classes, "lr": c["lr"], "debug_mode": False, "momentum": c["momentum"],
                  "weight_decay": c["weight_decay"], "schedule": c["schedule"], "schedule_type": c["schedule_type"],
                  "model_type": c["model_type"], "model_name": c["model_name"], "optimizer": c["optimizer"],
                  "gpuid": [-1], "memory": 0, "temp": 2.0, "out_dim": num_classes, "overwrite": False, "DW": False,
                  "batch_size": c["batch_size"], "upper_bound_flag": False, "tasks": tasks, "top_k": 1,
                  "prompt_param": [num_tasks, prompt_param]}
        config.update(extra_config or {})
        self.config = config
        torch.manual_seed(seed)
        with quiet():
            self.lrn = getattr(learners, learner)(config)
        self.init = self.to_ours_fn({n: p.detach().clone() for n, p in self._trainable().items()})
        load_vit_weights(self.lrn.model.feat, vit)
        self.task = -1

    def _trainable(self) -> Dict[str, nn.Parameter]:
        """What ``init_optimizer`` optimises, by name (``prompt.*``, ``last.*``)."""
        ids = {id(p) for g in self.lrn.optimizer.param_groups for p in g["params"]}
        return {n: p for n, p in self.lrn.model.named_parameters() if id(p) in ids}

    def tensors(self) -> Dict[str, Tensor]:
        return self.to_ours_fn({n: p.detach().clone() for n, p in self._trainable().items()})

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        theirs = self.to_theirs_fn(values)
        with torch.no_grad():
            for n, p in self._trainable().items():
                if n in theirs and theirs[n].shape == p.shape:
                    p.copy_(theirs[n])

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        lrn = self.lrn
        with quiet():
            if t > 0:  # the end of learn_batch for task t-1
                lrn.model.eval()
                lrn.last_valid_out_dim = lrn.valid_out_dim
                lrn.first_task = False
                lrn.task_count += 1
            lrn.model.task_id = t  # trainer.py train(), task t
            lrn.add_valid_output_dim(self.per)
            if t > 0 and lrn.model.prompt is not None:
                lrn.model.prompt.process_task_count()
            if lrn.reset_optimizer:  # learn_batch
                lrn.init_optimizer()
            lrn.data_weighting(None)
        self.task = t

    def boundary_state(self) -> Dict[str, Tensor]:
        # which of the tensors get a non-zero gradient is what decides what trains here: the
        # optimiser holds every component (the forward detaches the old ones)
        return {}

    def eval_logits(self, x: Tensor) -> Tensor:
        self.lrn.model.eval()
        with torch.no_grad():
            return self.lrn.model(x)

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        lrn = self.lrn
        seen: List[Any] = []
        crit: List[Tensor] = []
        # a copy: update_model writes -inf into a view of the output (the old classes)
        hook = lrn.model.register_forward_hook(
            lambda mod, a, out: seen.append((out[0].detach().clone(), out[1]) if isinstance(out, tuple) else out.detach().clone()))
        criterion = lrn.criterion

        def recording(logits: Tensor, targets: Tensor, dw: Tensor) -> Tensor:
            loss = criterion(logits, targets, dw)
            crit.append(loss.detach().clone())  # a copy, in case the loop adds to it in place
            return loss

        lrn.criterion = recording
        try:
            lrn.model.train()
            with quiet():
                lrn.update_model(x, y)
        finally:
            hook.remove()
            del lrn.criterion
        out = seen[-1]
        logits, prompt_loss = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        losses = {"ce": crit[-1]}
        if prompt_loss is not None and torch.is_tensor(prompt_loss):
            losses["aux"] = prompt_loss.sum().detach()
        grads = self.to_ours_fn({n: p.grad.detach().clone() for n, p in self._trainable().items() if p.grad is not None})
        return Step(logits.detach(), losses, grads, self.tensors())

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        """``init_optimizer`` and ``learn_batch``'s loop: ``if epoch > 0: self.scheduler.step()``."""
        lrn = self.lrn
        with quiet():
            lrn.init_optimizer()
        per_param: Dict[int, List[float]] = {}
        per_iter = self.config["schedule_type"] == "coswm"  # SMoPE / VQ learn_prompt: a step per iteration
        for epoch in range(self.config["schedule"][-1]):
            if epoch > 0 and not per_iter:
                lrn.scheduler.step()
            for g in lrn.optimizer.param_groups:
                for p in g["params"]:
                    per_param.setdefault(id(p), []).append(g["lr"])
            if per_iter:
                for _ in range(steps_per_epoch):
                    lrn.scheduler.step()
        named = self._trainable()
        theirs = {n: torch.tensor(per_param[id(p)], dtype=torch.float64) for n, p in named.items()}
        return self.lr_to_ours(theirs)

    def lr_to_ours(self, theirs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Per-tensor lrs under our names: each epoch's lrs as constant tensors of their shapes,
        mapped like the tensors themselves (an ours tensor assembled from tensors of theirs with
        different lrs gets NaN, which fails)."""
        named = self._trainable()
        epochs = len(next(iter(theirs.values()))) if theirs else 0
        out: Dict[str, List[float]] = {}
        for e in range(epochs):
            mapped = self.to_ours_fn({n: torch.full(named[n].shape, float(lr[e]), dtype=torch.float64)
                                      for n, lr in theirs.items()})
            for name, v in mapped.items():
                out.setdefault(name, []).append(float(v.flatten()[0]) if bool((v == v.flatten()[0]).all()) else float("nan"))
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}

    def steps_per_epoch(self, images: int) -> int:
        # trainer.py: DataLoader(train_dataset, batch_size, shuffle=True, drop_last=True)
        return len(torch.utils.data.DataLoader(range(images), batch_size=self.config["batch_size"], drop_last=True))

    def transform(self, image: np.ndarray, train: bool, seed: int) -> Tensor:
        from PIL import Image

        # trainer.py: resize_imnet is True for the ViT models (model_name starts with 'vit')
        tf = self.utils.get_transform(dataset=self.dataset, phase="train" if train else "test", aug=True,
                                      resize_imnet=True)
        torch.manual_seed(seed)
        return tf(Image.fromarray(image))


# --- name maps -------------------------------------------------------------------------------

def split_rows(tensor: Tensor, parts: int) -> List[Tensor]:
    return list(tensor.chunk(parts, dim=0))


def coda_maps(layers: List[int], num_tasks: int) -> Tuple[Names, Names]:
    """CODA-P: their ``prompt.e_{p,k,a}_<l>`` (pool rows) <-> our ``pools.<l>.{p,k,a}.<t>`` (task slices)."""

    def to_ours(theirs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out = {}
        for n, v in theirs.items():
            if n.startswith("prompt.e_"):
                kind, layer = n[len("prompt.e_"):].split("_")
                for t, part in enumerate(split_rows(v, num_tasks)):
                    out[f"pools.{layer}.{kind}.{t}"] = part
            elif n.startswith("last."):
                out["head." + n[len("last."):]] = v
            else:
                out[f"ref:{n}"] = v
        return out

    def to_theirs(ours: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out = {}
        for layer in layers:
            for kind in "pka":
                parts = [ours.get(f"pools.{layer}.{kind}.{t}") for t in range(num_tasks)]
                if all(p is not None for p in parts):
                    out[f"prompt.e_{kind}_{layer}"] = torch.cat(parts, 0)
        for k in ("weight", "bias"):
            if f"head.{k}" in ours:
                out[f"last.{k}"] = ours[f"head.{k}"]
        return out

    return to_ours, to_theirs


def pool_maps(e_layers: List[int], g_layers: List[int], ours_kind: str) -> Tuple[Names, Names]:
    """CODA's L2P / DualPrompt: ``prompt.e_p_<l>`` (pool, L, D), ``prompt.e_k_<l>`` (pool, D),
    ``prompt.g_p_<l>`` (L, D) <-> our l2p ``prompts.<j>`` / ``keys.<j>`` (j-th prefix layer) or
    our dualprompt ``e_prompt`` (layers, pool, L, D), ``keys`` (layers, pool, D), ``g_prompt``
    (layers, L, D)."""

    def to_ours(theirs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for n, v in theirs.items():
            if n.startswith("last."):
                out["head." + n[len("last."):]] = v
            elif not n.startswith("prompt."):
                out[f"ref:{n}"] = v
        if ours_kind == "l2p":
            for j, layer in enumerate(e_layers):
                for kind, name in (("p", "prompts"), ("k", "keys")):
                    if f"prompt.e_{kind}_{layer}" in theirs:
                        out[f"{name}.{j}"] = theirs[f"prompt.e_{kind}_{layer}"]
        else:
            for kind, name, layers in (("e_p", "e_prompt", e_layers), ("e_k", "keys", e_layers), ("g_p", "g_prompt", g_layers)):
                parts = [theirs.get(f"prompt.{kind}_{layer}") for layer in layers]
                if parts and all(p is not None for p in parts):
                    out[name] = torch.stack(parts)
        return out

    def to_theirs(ours: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for k in ("weight", "bias"):
            if f"head.{k}" in ours:
                out[f"last.{k}"] = ours[f"head.{k}"]
        if ours_kind == "l2p":
            for j, layer in enumerate(e_layers):
                for kind, name in (("p", "prompts"), ("k", "keys")):
                    if f"{name}.{j}" in ours:
                        out[f"prompt.e_{kind}_{layer}"] = ours[f"{name}.{j}"]
        else:
            for kind, name, layers in (("e_p", "e_prompt", e_layers), ("e_k", "keys", e_layers), ("g_p", "g_prompt", g_layers)):
                if name in ours:
                    for i, layer in enumerate(layers):
                        out[f"prompt.{kind}_{layer}"] = ours[name][i]
        return out

    return to_ours, to_theirs


# --- adapters --------------------------------------------------------------------------------

CODA_BENCHMARKS = {  # benchmark -> (configs/<yaml>, dataset name of get_transform)
    "cifar100": ("configs/cifar-100_prompt.yaml", "CIFAR100"),
    "imagenet_r": ("configs/imnet-r_prompt.yaml", "ImageNet_R"),
}
PULL_CHUNKS_DOC = "docs/methods-l2p-dualprompt.md#l2p-and-deep-l2p-variant-l2p-deep_l2p-coda-prompt-modelszoopyl2p (pull_chunks: CODA's 4-GPU DataParallel)"


class CodaRepoAdapter(Adapter):
    """Cases on CODA-Prompt's protocol (``coda`` preset), one per benchmark config of the repo."""

    repo = "GT-RIPL/CODA-Prompt"
    learner = ""
    preset = "coda"

    def check_ref(self, ref_dir: str) -> Optional[str]:
        if not os.path.exists(os.path.join(ref_dir, "learners", "prompt.py")) or \
                not os.path.exists(os.path.join(ref_dir, "configs", "cifar-100_prompt.yaml")):
            return f"--ref {ref_dir} has no learners/prompt.py and configs/cifar-100_prompt.yaml; pass a checkout of {self.repo}"
        return None

    def variants(self) -> List[Tuple[Dict[str, Any], List[float], Dict[str, str]]]:
        """(our overrides, their --prompt_param, documented deviations) per variant."""
        raise NotImplementedError

    def maps(self, case: Case, ours: Side) -> Tuple[Names, Names]:
        raise NotImplementedError

    def cases(self) -> List[Case]:
        out = []
        for bench, (yaml_file, dataset) in CODA_BENCHMARKS.items():
            for overrides, prompt_param, devs in self.variants():
                pp = " ".join(f"{v:g}" for v in prompt_param)
                out.append(Case(self.preset, bench, f"{yaml_file} --learner_name {self.learner} --prompt_param {pp}",
                                overrides=overrides, deviations=devs,
                                options={"yaml": yaml_file, "dataset": dataset, "prompt_param": prompt_param}))
        return out

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        to_ours, to_theirs = self.maps(case, ours)
        o = case.options
        return LearnerSide(self.learner, o["prompt_param"], os.path.join(ref_dir, o["yaml"]), o["dataset"], vit,
                           ours.num_classes, ours.cfg.benchmark.num_tasks, to_ours, to_theirs, seed)  # type: ignore[attr-defined]


@register_adapter
class CodaPromptAdapter(CodaRepoAdapter):
    method = "coda_prompt"
    learner = "CODAPrompt"

    def variants(self):
        return [({}, [100, 8, 0.0], {})]

    def maps(self, case: Case, ours: Side) -> Tuple[Names, Names]:
        cfg = ours.cfg.method  # type: ignore[attr-defined]
        return coda_maps(list(cfg.layers), ours.cfg.benchmark.num_tasks)  # type: ignore[attr-defined]


@register_adapter
class CodaL2PAdapter(CodaRepoAdapter):
    """L2P++ (``--prompt_param 30 20 -1``, what CODA's scripts run) and Deep L2P++ (``30 20 1``,
    the ``coda`` preset's default, the SMoPE table's row); ``pull_chunks: 4`` of the preset
    reproduces CODA's 4-GPU DataParallel and so differs from the reference run in one process,
    where the pull loss sums over the whole batch: the second case of each runs with 1 chunk."""

    method = "l2p"
    learner = "L2P"

    def variants(self):
        dev = {k: PULL_CHUNKS_DOC for k in ("loss/aux", "grad", "step")}
        return [({}, [30, 20, 1], dev),
                ({"method": {"pull_chunks": 1}}, [30, 20, 1], {}),
                ({"method": {"variant": "l2p++", "pool_size": 30, "length": 20, "prefix_layers": [0]}}, [30, 20, -1], dev),
                ({"method": {"variant": "l2p++", "pool_size": 30, "length": 20, "prefix_layers": [0], "pull_chunks": 1}},
                 [30, 20, -1], {})]

    def maps(self, case: Case, ours: Side) -> Tuple[Names, Names]:
        layers = [0, 1, 2, 3, 4] if case.options["prompt_param"][2] > 0 else [0]
        return pool_maps(layers, [], "l2p")


@register_adapter
class CodaDualPromptAdapter(CodaRepoAdapter):
    method = "dualprompt"
    learner = "DualPrompt"

    def variants(self):
        return [({}, [10, 20, 6], {})]

    def maps(self, case: Case, ours: Side) -> Tuple[Names, Names]:
        return pool_maps([2, 3, 4], [0, 1], "dualprompt")

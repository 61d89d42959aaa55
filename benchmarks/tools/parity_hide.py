"""Parity adapter for HiDe-Prompt (thu-ml/HiDe-Prompt), stage 2 (prompts + TAP head) on the TII
network of stage 1, as ``main.py <config>_hideprompt_5e`` runs it with the flags of
``training_scripts/train_{cifar100,imr,cub}_vit.sh`` (``trainers/hideprompt_trainer.py``: both
models, the two-group optimiser of ``--larger_prompt_lr``; ``engines/hide_promtp_wtp_and_tap_engine``:
the task loop, ``train_one_epoch``, ``evaluate``). The scripts launch 8 processes of 24 images;
this side runs one process, so its loader length is computed for 8 (``DistributedSampler``).

Compared: the init of every trainable tensor of both stages (prompts, TAP head, the TII MLP and
head), the prompt stage's boundary, step and schedule, eval logits (TII picks the prompt), the
transforms. Not compared (documented in docs/parity.md): the TII stage's training step (stage 1
is a separate launch with ``hide_tii_engine``), and end-of-task work (class statistics and the
two classifier alignments): the boundary starts with empty statistics on both sides
(``cls_mean`` empty, so the contrastive regulariser compares the batch's features only).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from benchmarks.tools.parity import Adapter, Case, Side, register_adapter
from benchmarks.tools.parity_jhlee import JHLeeSide

PROCESSES = 8  # --nproc_per_node of the training scripts


class HideSide(JHLeeSide):
    vit_modules = ("vits.hide_prompt_vision_transformer",)
    engine_name = "engines.hide_promtp_wtp_and_tap_engine"

    def __init__(self, *a: Any, tii_names: Optional[Dict[str, str]] = None, **k: Any) -> None:
        self.tii_names = tii_names or {}
        super().__init__(*a, **k)
        self.target_task_map = {c: t for t, cs in enumerate(self.class_mask) for c in cs}
        self.engine.cls_mean, self.engine.cls_cov = {}, {}

    def original_kwargs(self) -> Dict[str, Any]:
        return {"mlp_structure": self.args.original_model_mlp_structure}

    def _tii(self) -> Dict[str, nn.Parameter]:
        named = dict(self.original.named_parameters())
        return {ours: named[theirs] for theirs, ours in self.tii_names.items() if theirs in named}

    def original_init(self) -> Dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self._tii().items()}

    def tensors(self) -> Dict[str, Tensor]:
        out = super().tensors()
        out.update({n: p.detach().clone() for n, p in self._tii().items()})
        return out

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        super().set_tensors(values)
        with torch.no_grad():
            for n, p in self._tii().items():
                if n in values and values[n].shape == p.shape:
                    p.copy_(values[n])

    def _optimizer(self):
        """hideprompt_trainer.py: with --larger_prompt_lr two groups, prompts at lr, the rest at lr/10."""
        from timm.optim import create_optimizer

        if not self.args.larger_prompt_lr:
            return create_optimizer(self.args, self.model)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if "prompt" in n], "lr": self.args.lr, "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if "prompt" not in n], "lr": self.args.lr * 0.1,
                   "weight_decay": self.args.weight_decay}]
        return create_optimizer(self.args, groups)

    def run_train_and_evaluate(self) -> None:
        eng = self.engine
        saved = eng._compute_mean, eng.train_task_adaptive_prediction
        eng._compute_mean = lambda *a, **k: None  # end-of-task statistics: not compared (module docstring)
        eng.train_task_adaptive_prediction = lambda *a, **k: None
        try:
            eng.train_and_evaluate(self.model, self.model, self.original, nn.CrossEntropyLoss(),
                                   [{"train": []}] * self.args.num_tasks, None, self.optimizer, None, torch.device("cpu"),
                                   self.class_mask, self.target_task_map, self.args)
        finally:
            eng._compute_mean, eng.train_task_adaptive_prediction = saved
            eng.cls_mean, eng.cls_cov = {}, {}

    def one_epoch(self, crit: nn.Module, x: Tensor, y: Tensor) -> None:
        self.engine.train_one_epoch(self.model, self.original, crit, [(x, y)], self.optimizer, torch.device("cpu"), 0,
                                    self.args.clip_grad, True, self.task, self.class_mask, self.target_task_map, self.args)

    def aux_losses(self, out: Dict[str, Tensor]) -> Dict[str, Tensor]:
        # train_one_epoch: loss += orth_loss(pre_logits, ...), the contrastive regulariser
        return {"aux": self.engine.orth_loss(out["pre_logits"].detach(), None, torch.device("cpu"), self.args).detach()}

    def eval_logits(self, x: Tensor) -> Tensor:
        """engine.evaluate: the TII logits masked to the seen classes pick the prompt."""
        import numpy as np

        self.model.eval()
        self.original.eval()
        with torch.no_grad():
            logits = self.original(x)["logits"]
            seen = [c for t in range(self.task + 1) for c in self.class_mask[t]]
            not_mask = torch.tensor(np.setdiff1d(np.arange(self.args.nb_classes), seen), dtype=torch.int64)
            logits = logits.index_fill(1, not_mask, float("-inf"))
            prompt_id = torch.tensor([self.target_task_map[int(v)] for v in logits.argmax(1)]).unsqueeze(-1)
            return self.model(x, task_id=self.task, prompt_id=prompt_id)["logits"]

    def steps_per_epoch(self, images: int) -> int:
        per_process = math.ceil(images / PROCESSES)  # DistributedSampler pads to a multiple of 8
        return len(torch.utils.data.DataLoader(range(per_process), batch_size=self.args.batch_size))

    def transform(self, image, train: bool, seed: int) -> Tensor:
        from PIL import Image

        # datasets.py: build_cifar_transform for CIFAR-100, build_transform otherwise
        fn = self.datasets.build_cifar_transform if "cifar" in self.args.dataset.lower() else self.datasets.build_transform
        tf = fn(train, self.args)
        torch.manual_seed(seed)
        return tf(Image.fromarray(image))


def _prompt_to_ours(t: int):
    def f(v: Tensor) -> Tensor:  # (layers, 2, pool, L, H, dh) -> slot t (layers, 2, L, D)
        n, two, m, length, h, dh = v.shape
        return v[:, :, t].reshape(n, two, length, h * dh)
    return f


@register_adapter
class HidePromptAdapter(Adapter):
    method = "hide_prompt"
    repo = "thu-ml/HiDe-Prompt"
    end_of_task = False
    # config, script flags of the prompt stage (training_scripts/train_*_vit.sh)
    specs = {
        "cifar100": ("cifar100_hideprompt_5e", ["--epochs", "50", "--ca_lr", "0.005", "--crct_epochs", "30",
                                                "--prompt_momentum", "0.01", "--reg", "0.1", "--length", "5",
                                                "--sched", "step", "--larger_prompt_lr"]),
        "imagenet_r": ("imr_hideprompt_5e", ["--epochs", "150", "--ca_lr", "0.005", "--crct_epochs", "30",
                                             "--sched", "cosine", "--prompt_momentum", "0.01", "--reg", "0.5",
                                             "--length", "20", "--larger_prompt_lr"]),
        "cub200": ("cub_hideprompt_5e", ["--epochs", "50", "--ca_lr", "0.005", "--crct_epochs", "30",
                                         "--prompt_momentum", "0.01", "--reg", "0.01", "--length", "20"]),
    }

    def check_ref(self, ref_dir: str) -> Optional[str]:
        if not os.path.exists(os.path.join(ref_dir, "engines", "hide_promtp_wtp_and_tap_engine.py")):
            return f"--ref {ref_dir} has no engines/hide_promtp_wtp_and_tap_engine.py; pass a checkout of {self.repo}"
        return None

    doc = "docs/methods-hide-prompt.md#reference-quirks-reproduced-only-on-request (reshape_quirk off)"

    def cases(self) -> List[Case]:
        """Per config: the preset (its per-sample prompt layout differs from the reference's
        EPrompt reshape, documented: the checks downstream are DEVIATIONs), and the preset with
        ``reshape_quirk=true``, where every number must agree."""
        out = []
        for b, (c, flags) in self.specs.items():
            label = f"configs/{c}.py " + " ".join(flags)
            out.append(Case("paper", b, label, options={"config": c, "flags": flags},
                            deviations={k: self.doc for k in ("logits/*", "loss/*", "grad", "step")}))
            out.append(Case("paper", b, label, overrides={"method": {"reshape_quirk": True}},
                            options={"config": c, "flags": flags}))
        return out

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        num_tasks = ours.cfg.benchmark.num_tasks  # type: ignore[attr-defined]
        names: Dict[str, Any] = {"head.weight": "head.weight", "head.bias": "head.bias"}
        # one (layers, 2, pool, L, H, dh) tensor for every task's prompt -> our prompts.<t>; loading
        # ours back needs all of them, see set_tensors below
        names["e_prompt.prompt"] = ("prompts.0", _prompt_to_ours(0), None)
        side = HideSide(case.options["config"], vit, ours.num_classes, num_tasks, names,  # type: ignore[attr-defined]
                        extra=["--model", "vit_base_patch16_224", "--original_model", "vit_base_patch16_224",
                               "--batch-size", "24", *case.options["flags"]],
                        seed=seed, tii_names=tii_names(ours))
        return PromptSlots(side, num_tasks)


def tii_names(ours: Side) -> Dict[str, str]:
    """Their original model's TII MLP and head -> ours: ``mlp.net.<i>.0`` (Linear) and
    ``mlp.net.<i>.2`` (the middle block's LayerNorm; ours ``tii_mlp.net.<i>.1``), ``mlp.norm``, ``head``."""
    out = {"head.weight": "tii_head.weight", "head.bias": "tii_head.bias"}
    for n in ours.init:
        if n.startswith("tii_mlp."):
            rest = n[len("tii_mlp."):]
            parts = rest.split(".")
            if parts[0] == "net" and parts[2] == "1":  # LayerNorm inside a block
                parts[2] = "2"
            out["mlp." + ".".join(parts)] = n
    return out


class PromptSlots(Side):
    """Wraps a :class:`HideSide` so that its one prompt tensor (all task slots) reads and writes as
    our ``prompts.<t>``, one per task."""

    def __init__(self, side: HideSide, num_tasks: int) -> None:
        self.side, self.num_tasks = side, num_tasks
        self.image_size = side.image_size
        self.init = self._split(side.init, side.model.e_prompt.prompt.detach()) if hasattr(side.model, "e_prompt") else side.init

    def _split(self, d: Dict[str, Tensor], whole: Tensor) -> Dict[str, Tensor]:
        d = {k: v for k, v in d.items() if not k.startswith("prompts.")}
        for t in range(self.num_tasks):
            d[f"prompts.{t}"] = _prompt_to_ours(t)(whole)
        return d

    def _whole(self) -> nn.Parameter:
        return self.side.model.e_prompt.prompt

    def tensors(self) -> Dict[str, Tensor]:
        return self._split(self.side.tensors(), self._whole().detach().clone())

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        self.side.set_tensors({k: v for k, v in values.items() if not k.startswith("prompts.")})
        w = self._whole()
        n, two, m, length, h, dh = w.shape
        with torch.no_grad():
            for t in range(min(m, self.num_tasks)):
                if f"prompts.{t}" in values:
                    w[:, :, t].copy_(values[f"prompts.{t}"].reshape(n, two, length, h, dh))

    def start_task(self, t: int, prev=None) -> None:
        self.side.start_task(t, prev)

    def boundary_state(self) -> Dict[str, Tensor]:
        st = self.side.boundary_state()
        st.pop("trained:prompts.0", None)  # one tensor holds every slot: says nothing per slot
        return st

    def eval_logits(self, x: Tensor) -> Tensor:
        return self.side.eval_logits(x)

    def train_step(self, x: Tensor, y: Tensor):
        step = self.side.train_step(x, y)
        g = self._whole().grad
        if g is not None:
            step.grads = self._split(step.grads, g.detach().clone())
        step.after = self.tensors()
        return step

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        out = self.side.lrs(steps_per_epoch)
        lr = out.pop("prompts.0", None)
        if lr is not None:
            for t in range(self.num_tasks):
                out[f"prompts.{t}"] = lr
        return out

    def steps_per_epoch(self, images: int) -> int:
        return self.side.steps_per_epoch(images)

    def transform(self, image, train: bool, seed: int) -> Tensor:
        return self.side.transform(image, train, seed)

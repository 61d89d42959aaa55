"""Parity adapter for NoRGa (Minhchuyentoancbn/MoE_PromptCL), a fork of HiDe-Prompt: the HiDe adapter
(:mod:`benchmarks.tools.parity_hide`) on NoRGa's ``vits/norga_prompt_vision_transformer.py`` and
``engines/norga_prompt_engine.py``, with the flags of ``scripts/{cifar100,imr,cub}_Sup21k_NoRGa.sh``
(prompt stage; one process of 128 images). Their ``create_model`` call passes ``gate_act``
(``trainers/norgaprompt_trainer.py``), which the shared builder does not, so it is added here; the
gate ``e_prompt.act_scale`` (layers, 2, 1, 1) is our ``gate`` (layers, 2). Our side runs with
``reshape_quirk: true``: their ``EPrompt`` reshapes the gathered (layers, 2, B, ...) prompts to
(layers, B, 2, ...) without a permute (inherited from HiDe), which the option reproduces.
What is not compared is HiDe's adapter's list (the TII stage's step, end-of-task statistics and
alignments).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from benchmarks.tools.parity import Case, Side, register_adapter
from benchmarks.tools.parity_hide import HidePromptAdapter, HideSide, PromptSlots, _prompt_to_ours, tii_names


def six_stub() -> None:
    """Their ``continual_datasets/dataset_utils.py`` imports ``six.moves.urllib`` (a Python 2
    compatibility package not installed here) for downloads the harness never makes."""
    import sys
    import types
    import urllib

    if "six" not in sys.modules:
        moves = types.ModuleType("six.moves")
        moves.urllib = urllib  # type: ignore[attr-defined]
        six = types.ModuleType("six")
        six.moves = moves  # type: ignore[attr-defined]
        sys.modules["six"], sys.modules["six.moves"] = six, moves


class NoRGaSide(HideSide):
    vit_modules = ("vits.norga_prompt_vision_transformer",)
    engine_name = "engines.norga_prompt_engine"

    def __init__(self, *a: Any, gate_act: str = "sigmoid", **k: Any) -> None:
        import timm.models

        six_stub()

        create = timm.models.create_model

        def with_gate(name: str, **kw: Any) -> nn.Module:  # trainers/norgaprompt_trainer.py: gate_act=args.gate_act
            if "prompt_length" in kw:
                kw["gate_act"] = gate_act
            return create(name, **kw)

        timm.models.create_model = with_gate
        try:
            super().__init__(*a, **k)
        finally:
            timm.models.create_model = create

    def steps_per_epoch(self, images: int) -> int:
        # one process (the scripts launch main.py directly), drop_last False
        return len(torch.utils.data.DataLoader(range(images), batch_size=self.args.batch_size))

    # the gate stops being trainable after task 0 (act_scale.requires_grad_(False)), but it is still
    # one of the method's tensors: read and write it whatever its flag
    def _gate(self) -> nn.Parameter:
        return self.model.e_prompt.act_scale

    def tensors(self) -> Dict[str, Tensor]:
        out = super().tensors()
        out["gate"] = _gate_to_ours(self._gate().detach().clone())
        return out

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        super().set_tensors(values)
        if "gate" in values:
            with torch.no_grad():
                self._gate().copy_(_gate_to_theirs(values["gate"]))

    def boundary_state(self) -> Dict[str, Tensor]:
        """Their optimiser of the task (re-created at the boundary): the gate and the TII network
        (the original model) are in it or not, as for every other tensor."""
        st = super().boundary_state()
        optimised = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        st["trained:gate"] = torch.tensor(float(id(self._gate()) in optimised))
        for name, p in self._tii().items():
            st[f"trained:{name}"] = torch.tensor(float(id(p) in optimised))
        return st


class NoRGaSlots(PromptSlots):
    """Their one prompt tensor holds every task's slot and goes to the optimiser whole; only the
    current slot t receives a gradient (the ensemble's mean of the earlier slots is detached; the
    ``grad`` rows compare every slot, zeros included), and with the optimiser re-created each task
    (zero Adam moments) and weight decay 0 the other slots do not move (the ``step`` rows). So the
    trained flag and the lr are reported for slot t, the one the optimiser can change."""

    def __init__(self, side: HideSide, num_tasks: int) -> None:
        super().__init__(side, num_tasks)
        self.task = 0

    def start_task(self, t: int, prev=None) -> None:
        super().start_task(t, prev)
        self.task = t

    def boundary_state(self) -> Dict[str, Tensor]:
        st = super().boundary_state()
        for t in range(self.num_tasks):
            if t != self.task:
                st[f"trained:prompts.{t}"] = torch.tensor(0.0)
        return st

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        out = super().lrs(steps_per_epoch)
        return {k: v for k, v in out.items() if not k.startswith("prompts.") or k == f"prompts.{self.task}"}


def _gate_to_ours(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], 2)


def _gate_to_theirs(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], 2, 1, 1)


@register_adapter
class NoRGaAdapter(HidePromptAdapter):
    method = "norga"
    repo = "Minhchuyentoancbn/MoE_PromptCL"
    deviations: Dict[str, str] = {}
    common = ["--batch-size", "128", "--prompt_momentum", "0.01", "--ca_storage_efficient_method", "covariance",
              "--gate_act", "sigmoid"]
    specs = {
        "cifar100": ("cifar100_norgaprompt", ["--epochs", "50", "--ca_lr", "0.05", "--reg", "0.1", "--length", "5",
                                              "--sched", "step", "--larger_prompt_lr"]),
        "imagenet_r": ("imr_norgaprompt", ["--ca_lr", "0.005", "--crct_epochs", "30", "--epochs", "150",
                                           "--length", "20", "--reg", "0.5", "--sched", "cosine", "--larger_prompt_lr"]),
        "cub200": ("cub_norgaprompt", ["--epochs", "50", "--reg", "0.01", "--length", "20"]),
    }

    def check_ref(self, ref_dir: str) -> Optional[str]:
        if not os.path.exists(os.path.join(ref_dir, "engines", "norga_prompt_engine.py")):
            return f"--ref {ref_dir} has no engines/norga_prompt_engine.py; pass a checkout of {self.repo}"
        return None

    doc = "docs/methods-ovor-norga.md#parity-norga-reshape (reshape_quirk off)"

    def cases(self) -> List[Case]:
        """Per script: the preset (reshape_quirk off, documented: the checks downstream are
        DEVIATIONs), and the preset with ``reshape_quirk=true``, where every number must agree."""
        out = []
        for b, (c, flags) in self.specs.items():
            label, opts = f"configs/{c}.py " + " ".join(self.common + flags), {"config": c, "flags": self.common + flags}
            out.append(Case("paper", b, label, options=opts,
                            deviations={k: self.doc for k in ("logits/*", "loss/*", "grad", "step")}))
            out.append(Case("paper", b, label, overrides={"method": {"reshape_quirk": True}}, options=opts))
        return out

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        num_tasks = ours.cfg.benchmark.num_tasks  # type: ignore[attr-defined]
        names: Dict[str, Any] = {"head.weight": "head.weight", "head.bias": "head.bias",
                                 "e_prompt.prompt": ("prompts.0", _prompt_to_ours(0), None),
                                 "e_prompt.act_scale": ("gate", _gate_to_ours, _gate_to_theirs)}
        side = NoRGaSide(case.options["config"], vit, ours.num_classes, num_tasks, names,  # type: ignore[attr-defined]
                         extra=["--model", "vit_base_patch16_224", "--original_model", "vit_base_patch16_224",
                                *case.options["flags"]],
                         seed=seed, tii_names=tii_names(ours))
        return NoRGaSlots(side, num_tasks)

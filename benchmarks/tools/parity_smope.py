"""Parity adapters for SMoPE (Minhchuyentoancbn/SMoPE) and VQ-Prompt (jiaolifengmi/VQ-Prompt),
both forks of the CODA-Prompt learner code: :class:`benchmarks.tools.parity_coda.LearnerSide` drives
their ``OnePrompt`` / ``VQPrompt`` learners (``pretrained_weight`` None: their ``models/zoo.py``
builds a randomly initialised ViT, which gets our random weights).

Not compared: the end-of-task work of both (SMoPE's expert-usage counting and both methods'
class statistics and classifier alignment run by ``trainer.py`` after ``learn_batch``), so the
boundary starts from zero usage counts on both sides; the boundary still compares what
``process_task_count`` does (SMoPE: the snapshot of the keys for the prototype loss and the
frequent-expert flags).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from benchmarks.tools.parity import Adapter, Case, Side, register_adapter
from benchmarks.tools.parity_coda import LearnerSide, Names


class ForkSide(LearnerSide):
    """A learner of a CODA fork, with ``boundary_state`` from ``state_fn(learner)``."""

    def __init__(self, *a: Any, state_fn=None, **k: Any) -> None:
        super().__init__(*a, **k)
        self.state_fn = state_fn

    def boundary_state(self) -> Dict[str, Tensor]:
        return self.state_fn(self.lrn) if self.state_fn else {}


class ForkAdapter(Adapter):
    """One case per benchmark config of the fork (``cases_spec``: benchmark -> (yaml,
    get_transform dataset name, --prompt_param))."""

    learner = ""
    marker = ""
    preset = "paper"
    end_of_task = False
    cases_spec: Dict[str, Tuple[str, str, List[float]]] = {}

    def check_ref(self, ref_dir: str) -> Optional[str]:
        if not os.path.exists(os.path.join(ref_dir, self.marker)):
            return f"--ref {ref_dir} has no {self.marker}; pass a checkout of {self.repo}"
        return None

    def cases(self) -> List[Case]:
        out = []
        for bench, (yaml_file, dataset, pp) in self.cases_spec.items():
            label = " ".join(f"{v:g}" for v in pp)
            out.append(Case(self.preset, bench, f"{yaml_file} --learner_name {self.learner} --prompt_param {label}",
                            options={"yaml": yaml_file, "dataset": dataset, "prompt_param": pp}))
        return out

    def maps(self, ours: Side) -> Tuple[Names, Names]:
        raise NotImplementedError

    def state(self, ours: Side):
        return None

    def ours(self, case: Case, vit: nn.Module, seed: int = 0) -> Side:
        side = super().ours(case, vit, seed)
        side.buffers = self.our_buffers  # type: ignore[attr-defined]
        return side

    our_buffers: List[str] = []

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        import yaml

        o = case.options
        path = os.path.join(ref_dir, o["yaml"])
        with open(path) as f:
            c = yaml.safe_load(f)
        to_ours, to_theirs = self.maps(ours)
        return ForkSide(self.learner, o["prompt_param"], path, o["dataset"], vit, ours.num_classes,  # type: ignore[attr-defined]
                        ours.cfg.benchmark.num_tasks, to_ours, to_theirs, seed,  # type: ignore[attr-defined]
                        extra_config={"iter_step": c.get("iter_step"), "pretrained_weight": None},
                        state_fn=self.state(ours))


@register_adapter
class SMoPEAdapter(ForkAdapter):
    method = "smope"
    repo = "Minhchuyentoancbn/SMoPE"
    learner = "OnePrompt"
    marker = "configs/cifar-100_prompt_smope.yaml"
    # experiments/*.sh; the 10-task ImageNet-R line names a learner 'VAPTPrompt' that the
    # repository does not define: OnePrompt with that line's --prompt_param
    cases_spec = {
        "cifar100": ("configs/cifar-100_prompt_smope.yaml", "CIFAR100", [50, 5, 1e-5, 1e-5, 0.4]),
        "imagenet_r": ("configs/imnet-r_prompt_smope.yaml", "ImageNet_R", [50, 5, 5e-5, 1e-4, 0.5]),
        "cub200": ("configs/cub-200_prompt_smope.yaml", "CUB200", [50, 5, 1e-5, 5e-5, 0.4]),
    }
    our_buffers = ["old_keys", "frequent"]

    def maps(self, ours: Side) -> Tuple[Names, Names]:
        n_l, h, e, dh = ours.init["keys"].shape
        layers = list(ours.cfg.method.layers)  # type: ignore[attr-defined]

        def to_ours(theirs: Dict[str, Tensor]) -> Dict[str, Tensor]:
            out: Dict[str, Tensor] = {}
            for kind, name in (("pk", "keys"), ("pv", "values")):
                parts = [[[theirs.get(f"prompt.e_{kind}_{layer}_{x}_{hh}") for x in range(e)] for hh in range(h)]
                         for layer in layers]
                flat = [p for a in parts for b in a for p in b]
                if flat and all(p is not None for p in flat):
                    out[name] = torch.stack([torch.stack([torch.cat(b, 0) for b in a]) for a in parts])
            for n, v in theirs.items():
                if n.startswith("last."):
                    out["head." + n[len("last."):]] = v
                elif not n.startswith("prompt.e_p"):
                    out[f"ref:{n}"] = v
            return out

        def to_theirs(ours_t: Dict[str, Tensor]) -> Dict[str, Tensor]:
            out: Dict[str, Tensor] = {}
            for kind, name in (("pk", "keys"), ("pv", "values")):
                if name in ours_t:
                    for i, layer in enumerate(layers):
                        for hh in range(h):
                            for x in range(e):
                                out[f"prompt.e_{kind}_{layer}_{x}_{hh}"] = ours_t[name][i, hh, x].unsqueeze(0)
            for k in ("weight", "bias"):
                if f"head.{k}" in ours_t:
                    out[f"last.{k}"] = ours_t[f"head.{k}"]
            return out

        return to_ours, to_theirs

    def state(self, ours: Side):
        layers = list(ours.cfg.method.layers)  # type: ignore[attr-defined]
        n_l, h, e, dh = ours.init["keys"].shape

        def state(lrn: Any) -> Dict[str, Tensor]:
            pr = lrn.model.prompt
            if not hasattr(pr, f"old_e_pk_{layers[0]}_0_0"):
                return {}
            old = torch.stack([torch.stack([torch.cat([getattr(pr, f"old_e_pk_{layer}_{x}_{hh}") for x in range(e)], 0)
                                            for hh in range(h)]) for layer in layers])
            freq = torch.tensor([[[float(pr.used_frequently[layer][hh][x]) for x in range(e)] for hh in range(h)]
                                 for layer in layers])
            return {"buffer:old_keys": old, "buffer:frequent": freq}

        return state


@register_adapter
class VQPromptAdapter(ForkAdapter):
    method = "vq_prompt"
    repo = "jiaolifengmi/VQ-Prompt"
    learner = "VQPrompt"
    marker = "configs/cifar-100_prompt_vq.yaml"
    cases_spec = {  # experiments/{cifar-100,imagenet-r_all,cub-200}.sh
        "cifar100": ("configs/cifar-100_prompt_vq.yaml", "CIFAR100", [10, 8, 1]),
        "imagenet_r": ("configs/imnet-r_prompt_vq.yaml", "ImageNet_R", [10, 8, 1]),
        "cub200": ("configs/cub-200_prompt_vq.yaml", "CUB200", [10, 8, 5]),
    }

    def maps(self, ours: Side) -> Tuple[Names, Names]:
        layers = list(ours.cfg.method.layers)  # type: ignore[attr-defined]

        def to_ours(theirs: Dict[str, Tensor]) -> Dict[str, Tensor]:
            out: Dict[str, Tensor] = {}
            for kind, name in (("p", "prompts"), ("k", "keys")):
                parts = [theirs.get(f"prompt.e_{kind}_{layer}") for layer in layers]
                if all(p is not None for p in parts):
                    out[name] = torch.stack(parts)
            for n, v in theirs.items():
                if n.startswith("last."):
                    out["head." + n[len("last."):]] = v
                elif not (n.startswith("prompt.e_p_") or n.startswith("prompt.e_k_")):
                    out[f"ref:{n}"] = v
            return out

        def to_theirs(ours_t: Dict[str, Tensor]) -> Dict[str, Tensor]:
            out: Dict[str, Tensor] = {}
            for kind, name in (("p", "prompts"), ("k", "keys")):
                if name in ours_t:
                    for i, layer in enumerate(layers):
                        out[f"prompt.e_{kind}_{layer}"] = ours_t[name][i]
            for k in ("weight", "bias"):
                if f"head.{k}" in ours_t:
                    out[f"last.{k}"] = ours_t[f"head.{k}"]
            return out

        return to_ours, to_theirs

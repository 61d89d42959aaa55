"""Parity adapter for APER / ADAM (zhoudw-zdw/RevisitingCIL), on the first-session pieces of
:mod:`benchmarks.tools.parity_ranpac` (the two code bases share the learner structure).

The reference side is their ``models/aper_adapter.Learner`` built from
``exps/aper_adapter/<dataset>_*.json`` and driven through ``incremental_train`` with the one-batch
data manager: task 0 with ``_init_train`` stubbed (it records the SGD, the ``CosineAnnealingLR``
and the phase-1 network), then their ``construct_dual_branch_network`` (a fresh copy of the
pretrained ViT -- our random one -- as the frozen branch, the tuned one as the second) and
``replace_fc`` (class means of the concatenated features) run for real. The step is one iteration
of their ``_init_train`` loop body on the phase-1 ``SimpleVitNet``; eval logits are their
dual-branch network's (σ = 1 cosine to the prototypes of the classes seen after task 0).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from benchmarks.tools.parity import Case, Side, register_adapter
from benchmarks.tools.parity_pilot import PilotAdapter, their_data
from benchmarks.tools.parity_ranpac import FirstSessionRefSide, FirstSessionSide


class APERRefSide(FirstSessionRefSide):
    learner_module = "models.aper_adapter"

    def start_task(self, t: int, prev: Optional[Any] = None) -> None:
        super().start_task(t, prev)
        if t == 1:
            # replace_fc sets the rows of the classes the batch has images of; with a batch of 2,
            # the other rows of the seen classes keep generate_fc's random init (ours: zeros). In a
            # run every class has images, so those rows are zeroed here, as ours
            w = self.lrn._network.fc.weight
            absent = torch.ones(w.shape[0], dtype=torch.bool)
            absent[prev[1].unique()] = False
            with torch.no_grad():
                w[absent] = 0.0

    def boundary_state(self) -> Dict[str, Tensor]:
        out = {f"trained:{n}": torch.tensor(0.0) for n in self.own()}  # no optimiser after task 0
        out["buffer:prototypes"] = self.lrn._network.fc.weight.detach().double()
        return out


@register_adapter
class APERAdapter(PilotAdapter):
    method = "aper"
    repo = "zhoudw-zdw/RevisitingCIL"
    deviations: Dict[str, str] = {}

    SPEC = {"cifar100": "exps/aper_adapter/cifar224_5_5_vit-b_adapter.json",
            "imagenet_r": "exps/aper_adapter/imagenetr_5_5_vit-b_adapter.json",
            "cub200": "exps/aper_adapter/cub_10_10_vit-b_adapter.json"}

    ref_file = "models/aper_adapter.py"

    def cases(self) -> List[Case]:
        out = [Case("paper", b, f, options={"json": f, "learner": "models.aper_adapter"}) for b, f in self.SPEC.items()]
        # the SSF variant (--set method.petl=ssf), on CIFAR: models/aper_ssf.py
        f = "exps/aper_ssf/cifar224_5_5_vit-b_ssf.json"
        out.append(Case("paper", "cifar100", f, overrides={"method": {"petl": "ssf"}},
                        options={"json": f, "learner": "models.aper_ssf"}))
        return out

    def ours(self, case: Case, vit: nn.Module, seed: int = 0) -> Side:
        side = FirstSessionSide(self.method, self.config(case), vit, seed)
        side.buffers = ["prototypes"]
        side.class_rows = ("prototypes",)
        return side

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        args = self.json_args(ref_dir, case)
        D = their_data()
        sizes = self.task_sizes(args, ours)
        APERRefSide.learner_module = case.options["learner"]
        return APERRefSide(ref_dir, args, vit, ours, ours.num_classes, sizes,  # type: ignore[arg-type,attr-defined]
                           D.build_transform(True, None), D.build_transform(False, None))

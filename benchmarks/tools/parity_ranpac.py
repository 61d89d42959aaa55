"""Parity adapter for RanPAC (RanPAC/RanPAC), and the first-session pieces APER shares with it.

The reference side is their ``RanPAC.Learner`` built from a row of ``args/<dataset>_publish.csv``
and driven through its own ``incremental_train`` with a stand-in data manager (one batch):

* the model: ``inc_net.SimpleVitNet`` -> ``get_convnet``; the pretrained ViT their adapter builder
  downloads with ``timm.create_model(..., pretrained=True)`` is our random ViT, which then goes
  through their own loading path (q/k/v split, ``mlp.fc*`` renames, "freeze all but the missing
  keys");
* task 0 (the boundary): ``incremental_train`` with ``_init_train`` stubbed (it records the
  optimiser, the scheduler and the first-session head it gets; the training step is compared on
  its own), then their ``freeze_backbone``, ``setup_RP`` and ``replace_fc`` run for real on a batch
  of task 0. Their ``W_rand`` comes from the global RNG, ours from a seeded generator (documented):
  its distribution is compared (``boundary/redrawn``), then ours replaces theirs before
  ``replace_fc``, so that G, Q and the ridge readout are compared value for value. The order of
  the rows in ``replace_fc`` (their loader shuffles with the global RNG; the 80/20 split of the
  ridge choice follows it) is ours, for the same reason;
* the training step: one iteration of their ``_init_train`` (the body of their loop, on the
  recorded SGD) with the first-session head, on the task-1 batch relabelled to task 0's classes
  (phase 1 trains on task 0 only); adapter dropout runs from the same seed on both sides;
* lr: the recorded ``CosineAnnealingLR`` stepped once per epoch as their loop steps it;
* eval logits: their ``SimpleVitNet`` with the RP head ``replace_fc`` left (the classes seen
  after task 0; ours shows the same columns).
"""
from __future__ import annotations

import copy
import csv
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.tools.parity import (TASK, Case, OurSide, Side, Step, captured_forward, method_tensors, our_lrs,
                                    register_adapter)
from benchmarks.tools.parity_pilot import STEP_SEED, PilotAdapter, PilotRefSide, patched_create_model, their_data


def csv_args(path: str, row_id: int) -> Dict[str, Any]:
    """A row of their ``args/*_publish.csv`` as ``main.py`` passes it (numbers and booleans parsed,
    ``device`` a list), on the CPU."""
    with open(path) as f:
        for row in csv.DictReader(f):
            if int(row["ID"]) == row_id:
                out: Dict[str, Any] = {}
                for k, v in row.items():
                    if v in ("True", "False"):
                        out[k] = v == "True"
                    else:
                        try:
                            out[k] = int(v)
                        except ValueError:
                            try:
                                out[k] = float(v)
                            except ValueError:
                                out[k] = v
                out["seed"], out["device"], out["do_not_save"] = [out["seed"]], ["cpu"], True
                return out
    raise KeyError(f"no row {row_id} in {path}")


def adapter_names(theirs: str) -> Optional[str]:
    """Their adapter parameter name (``blocks.i.adaptmlp.{down,up}_proj.*``) -> ours."""
    parts = theirs.split(".")
    if len(parts) == 5 and parts[0] == "blocks" and parts[2] == "adaptmlp":
        return f"peft.adapters.{parts[1]}.{parts[3][:-5]}.{parts[4]}"
    return None


# --- our side, with the step and the schedule of the first session -------------------------

class FirstSessionSide(OurSide):
    """Our first-session method (APER, RanPAC): training happens in task 0 only, so the step, the
    lr schedule and the loader are task 0's (on the harness's task-1 batch relabelled to task 0's
    classes); ``buffers`` are reported at the boundary (``Wo`` / prototypes cut to the classes seen
    after task 0, as the reference's head has only those rows); eval logits likewise."""

    extra_tensors: List[str] = []  # buffers shown as tensors (W_rand: re-drawn at the boundary)

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.method.begin_task(self.tasks[0])  # the first-session head exists from task 0 on
        self.init = {n: p.detach().clone() for n, p in method_tensors(self.method).items()}

    @property
    def seen(self) -> int:
        return self.tasks[TASK - 1].class_end

    def tensors(self) -> Dict[str, Tensor]:
        out = super().tensors()
        bufs = dict(self.method.named_buffers())
        out.update({n: bufs[n].detach().clone() for n in self.extra_tensors if bufs.get(n) is not None})
        return out

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        super().set_tensors(values)
        bufs = dict(self.method.named_buffers())
        with torch.no_grad():
            for n in self.extra_tensors:
                if n in values and bufs.get(n) is not None:
                    bufs[n].copy_(values[n])

    def boundary_state(self) -> Dict[str, Tensor]:
        phases = self.method.phases(self.tasks[TASK])
        trained = {id(p) for ph in phases for g in (ph.param_groups or self.method.param_groups())
                   for p in g["params"] if p.requires_grad}
        out = {f"trained:{n}": torch.tensor(float(id(p) in trained)) for n, p in method_tensors(self.method).items()}
        bufs = dict(self.method.named_buffers())
        for n in self.buffers:
            v = bufs[n].detach().clone().double()
            out[f"buffer:{n}"] = v[: self.seen] if n in self.class_rows else v
        return out

    class_rows: Tuple[str, ...] = ()  # buffers whose rows are classes (cut to the seen ones)

    def eval_logits(self, x: Tensor) -> Tensor:
        return super().eval_logits(x)[:, : self.seen]

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        from benchmarks.run.speed import TrainStep

        t0 = self.tasks[0]
        y0 = y - self.tasks[TASK].class_start + t0.class_start
        self.method.begin_task(t0)  # phase 1's trainable set
        out = captured_forward(self.method, TrainStep(self.method, t0, x, y0, self.cfg.train), STEP_SEED)
        logits = out.logits[:, t0.class_start: t0.class_end]
        losses = {"ce": F.cross_entropy(logits.float(), y0 - t0.class_start).detach()}
        if out.aux_loss is not None:
            losses["aux"] = out.aux_loss.detach()
        grads = {n: p.grad.detach().clone() for n, p in method_tensors(self.method).items() if p.grad is not None}
        return Step(logits.detach(), losses, grads, self.tensors())

    def _phase(self):
        return self.method.phases(self.tasks[0])[-1]

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        from benchmarks.run.protocol import phase_config

        self.method.begin_task(self.tasks[0])
        phase = self._phase()
        groups = phase.param_groups if phase.param_groups is not None else self.method.param_groups()
        return our_lrs(groups, phase_config(self.cfg.train, phase), steps_per_epoch, method_tensors(self.method))

    def steps_per_epoch(self, images: int) -> int:
        from benchmarks.run.protocol import phase_config

        tcfg = phase_config(self.cfg.train, self._phase())
        drop = tcfg.drop_last and images >= tcfg.batch_size
        return images // tcfg.batch_size if drop else math.ceil(images / tcfg.batch_size)


# --- the reference side ----------------------------------------------------------------------

class FirstSessionRefSide(PilotRefSide):
    """A RevisitingCIL-style learner (RanPAC's ``RanPAC.Learner``, APER's ``models/*.Learner``)
    driven through ``incremental_train`` as described in the module docstring (``to_ours`` maps
    their head, adapter and SSF names to ours). Subclasses report ``boundary_state``."""

    learner_module = ""

    def __init__(self, ref_dir: str, args: Dict[str, Any], vit: nn.Module, ours: FirstSessionSide,
                 num_classes: int, sizes: List[int], train_tf: List[Any], test_tf: List[Any]) -> None:
        self.ours, self.train_tf, self.test_tf, self.vit = ours, train_tf, test_tf, vit
        self.mod, lrn = self.build_learner(self.learner_module, args, vit, num_classes, sizes)
        lrn.is_dil, lrn.dil_init = False, False
        self.lrn, self.args = lrn, args
        self.recorded: Dict[str, Any] = {}

        def init_train(train_loader, test_loader, optimizer, scheduler):  # stub: record, do not train
            fc = lrn._network.fc
            with torch.no_grad():  # the task-0 head holds what the harness loaded (see start_task)
                fc.weight.copy_(self.head["weight"])
                fc.sigma.copy_(self.head["sigma"])
            # setup_RP later swaps fc.weight for the readout; the step trains this head, whose
            # parameters are the ones the recorded optimiser holds
            train_fc = copy.deepcopy(fc)
            train_fc._parameters["weight"], train_fc._parameters["sigma"] = fc.weight, fc.sigma
            self.head = {"weight": fc.weight, "sigma": fc.sigma}
            self.recorded.update(optimizer=optimizer, scheduler=scheduler, fc=train_fc, net=lrn._network,
                                 flags={id(p): p.requires_grad for p in lrn._network.parameters()})

        lrn._init_train = init_train
        lrn._compute_accuracy = lambda *a, **k: 0.0
        # the init check: their adapter (built above) and a first-session head as update_fc makes
        # it; its values go into the head incremental_train makes for task 0
        lrn._network.update_fc(sizes[0])
        fc0 = lrn._network.fc
        self.head: Dict[str, nn.Parameter] = {"weight": fc0.weight, "sigma": fc0.sigma}
        self.init = self.tensors()

    # names
    def to_ours(self, name: str) -> Optional[str]:
        """Their parameter name -> ours: the first-session head, the adapter or SSF tensors."""
        if name in ("fc.weight", "fc.sigma"):
            return "fs_head." + name[3:]
        if name.startswith("convnet."):
            n = name[len("convnet."):]
            return ssf_name(n) if "ssf_" in n else adapter_names(n)
        return None

    def convnet(self) -> nn.Module:
        """The tuned backbone (phase 1's network's ``convnet``; APER's dual-branch network keeps it
        as ``convnets[1]``, the same module)."""
        return self.recorded.get("net", self.lrn._network).convnet

    def own(self) -> Dict[str, nn.Parameter]:
        """The mapped trainable tensors: the PEFT module's and the first-session head's."""
        out = {}
        for n, p in self.convnet().named_parameters():
            o = self.to_ours("convnet." + n)
            if o is not None:
                out[o] = p
        for n, p in self.head.items():
            out[self.to_ours("fc." + n) or f"ref:fc.{n}"] = p
        return out

    def tensors(self) -> Dict[str, Tensor]:
        out = {n: p.detach().clone() for n, p in self.own().items()}
        flags = self.recorded.get("flags", {})
        for n, p in self.convnet().named_parameters():  # trained in phase 1 but unmapped: shown
            if flags.get(id(p)) and self.to_ours("convnet." + n) is None:
                out[f"ref:convnet.{n}"] = p.detach().clone()
        return out

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        if t == 0:
            return  # their task 0 runs at the boundary, when its batch is there (see docstring)
        assert t == 1 and prev is not None
        self.data.batch = prev
        self.before_replace_fc()
        from benchmarks.tools.refcompare import quiet

        with patched_create_model(self.vit), quiet():  # APER builds its frozen branch here
            self.lrn.incremental_train(self.data)
        self.lrn.after_task()

    def before_replace_fc(self) -> None:
        """Hook: what to change between their task-0 training and ``replace_fc``."""

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        rec = self.recorded
        net = rec["net"]  # phase 1's network (RanPAC: the learner's; APER: replaced by the dual branch)
        saved_fc = net.fc
        net.fc = rec["fc"]
        for p in net.parameters():
            p.requires_grad_(rec["flags"].get(id(p), False))
        y0 = y - self.ours.tasks[TASK].class_start + self.ours.tasks[0].class_start
        opt = rec["optimizer"]
        seen: List[Tensor] = []
        hook = net.register_forward_hook(lambda mod, a, out: seen.append(out["logits"]))
        torch.manual_seed(STEP_SEED)
        # one iteration of their _init_train loop body
        net.train()
        logits = net(x)["logits"]
        loss = F.cross_entropy(logits, y0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook.remove()
        grads = self.grads()
        after = self.tensors()
        net.fc = saved_fc
        return Step(logits.detach(), {"ce": loss.detach()}, grads, after)

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        return self.recorded_lrs(self.args["tuned_epoch"])  # stepped per epoch, as _init_train

    def steps_per_epoch(self, images: int) -> int:
        # their training DataLoader: batch_size=args["batch_size"], shuffle=True, no drop_last
        return self.loader_steps(images, getattr(self.lrn, "_batch_size", None) or self.lrn.batch_size)


class RanPACRefSide(FirstSessionRefSide):
    learner_module = "RanPAC"
    drawn: Optional[Tensor] = None  # their W_rand (before setup_RP: zeros, as our buffer)

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        m = self.args["M"]
        self.drawn = torch.zeros(768, m)  # W_rand before setup_RP draws it (ours: zeros)
        orig = self.lrn.setup_RP

        def setup_rp():
            orig()  # their draw from the global RNG ...
            self.drawn = self.lrn.W_rand.detach().clone()
            ours = self.ours.method.w_rand.detach().clone()  # ... replaced by ours (documented)
            self.lrn.W_rand = ours.clone()
            self.lrn._network.fc.W_rand = ours.clone()

        self.lrn.setup_RP = setup_rp

    def tensors(self) -> Dict[str, Tensor]:
        out = super().tensors()
        if self.drawn is not None:
            out["w_rand"] = self.drawn.clone()
        return out

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        super().set_tensors(values)
        if "w_rand" in values:
            self.drawn = values["w_rand"].clone()
            if hasattr(self.lrn, "W_rand"):
                self.lrn.W_rand = values["w_rand"].clone()
                self.lrn._network.fc.W_rand = values["w_rand"].clone()

    def boundary_state(self) -> Dict[str, Tensor]:
        lrn = self.lrn
        out = {f"trained:{n}": torch.tensor(0.0) for n in self.own()}  # no optimiser after task 0
        out["buffer:G"] = lrn.G.double()
        out["buffer:Q"] = lrn.Q.double()
        out["buffer:Wo"] = lrn._network.fc.weight.detach().double()
        return out


def ssf_name(n: str) -> Optional[str]:
    """Their SSF parameter (``blocks.i.attn.ssf_scale_1`` ...) -> ours (``peft.ssf.<site>.scale``)."""
    kind = "scale" if "ssf_scale" in n else "shift"
    idx = n.rsplit("_", 1)[1]
    parts = n.split(".")
    if parts[0] == "patch_embed":
        site = "patch"
    elif len(parts) == 1:
        site = "norm"
    elif parts[0] == "blocks":
        i, sub = parts[1], parts[2]
        site = {("attn", "1"): "qkv", ("attn", "2"): "proj", ("mlp", "1"): "fc1", ("mlp", "2"): "fc2"}.get(
            (sub, idx), {"1": "norm1", "2": "norm2"}[idx] if sub.startswith("ssf") else None)
        if site is None:
            return None
        site = f"b{i}_{site}"
    else:
        return None
    return f"peft.ssf.{site}.{kind}"


@register_adapter
class RanPACAdapter(PilotAdapter):
    method = "ranpac"
    repo = "RanPAC/RanPAC"
    # W_rand comes from another generator on each side: boundary/redrawn compares its distribution
    deviations: Dict[str, str] = {}

    # (benchmark, csv, row ID of "RanPAC", their build_transform isCifar)
    SPEC = {"cifar100": ("args/cifar224_publish.csv", 7, True),
            "imagenet_r": ("args/imagenetr_publish.csv", 7, False),
            "cub200": ("args/cub_publish.csv", 7, False)}

    ref_file = "RanPAC.py"

    def cases(self) -> List[Case]:
        # M = 2000 instead of 10000: 35 solves of an M x M system per side on one CPU thread;
        # nothing in either side's arithmetic depends on M beyond the sizes
        return [Case("paper", b, f"{csv_file} ID {row} (M 2000)", overrides={"method": {"M": 2000}},
                     options={"csv": csv_file, "row": row, "cifar": cifar})
                for b, (csv_file, row, cifar) in self.SPEC.items()]

    def ours(self, case: Case, vit: nn.Module, seed: int = 0) -> Side:
        side = FirstSessionSide(self.method, self.config(case), vit, seed)
        side.extra_tensors = ["w_rand"]
        side.buffers = ["G", "Q", "Wo"]
        side.class_rows = ("Wo",)
        return side

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        o = case.options
        args = csv_args(os.path.join(ref_dir, o["csv"]), o["row"])
        args["M"] = ours.cfg.method.M  # type: ignore[attr-defined]
        D = their_data()
        n_tasks = ours.cfg.benchmark.num_tasks  # type: ignore[attr-defined]
        sizes = [ours.num_classes // n_tasks] * n_tasks  # type: ignore[attr-defined]
        return RanPACRefSide(ref_dir, args, vit, ours, ours.num_classes, sizes,  # type: ignore[arg-type,attr-defined]
                             D.build_transform(True, None, o["cifar"]), D.build_transform(False, None, o["cifar"]))

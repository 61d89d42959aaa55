"""Parity adapter for EASE (sun-hailong/CVPR24-Ease).

The reference side is their ``models/ease.Learner`` built from ``exps/ease_<dataset>_in21k.json``
(the in21k configs the ``paper`` preset follows) and driven through its own ``incremental_train``
with the one-batch data manager of :mod:`benchmarks.tools.parity_pilot`:

* model: ``utils/inc_net.EaseNet`` / ``backbone/vit_ease.py``; the pretrained ViT their builder
  loads is our random ViT, through their loading path (q/k/v split, renames, "train only the
  missing keys");
* boundary (task 0 -> 1): ``incremental_train`` of task 0 with ``_init_train`` stubbed (no
  training), their ``replace_fc`` (prototypes of task 0's classes through adapter 0) on a batch of
  task 0, ``after_task`` (``freeze``, ``add_adapter_to_list``: adapter 0 kept, a fresh adapter 1),
  then ``incremental_train`` of task 1 up to its ``_init_train`` (``update_fc``: a fresh proxy head
  and the widened prototype matrix; the optimiser and scheduler of task 1, recorded), where it
  stops: task 1's own ``replace_fc`` is the end of task 1;
* end of task 1, reported in ``boundary_state`` and undone afterwards on both sides: their
  ``replace_fc`` (prototypes through adapters 0 and 1, then ``solve_sim_reset``, the
  semantic-guided complement) on a batch of task 1 against our ``end_task``
  (``buffer:prototypes@end_of_task_1``), so the complement is compared on real features, and the
  eval logits of that batch on that state (``buffer:logits@end_of_task_1``: ``forward_reweight``
  with every prototype block filled);
* step: one iteration of their ``_init_train`` loop body (``network(x, test=False)``: the current
  adapter and the proxy head, CE on the task-local labels, the recorded SGD); adapter dropout from
  the same RNG state on both sides;
* eval: ``network(x, test=True)`` (``forward_test`` + ``forward_reweight``) over the classes seen.

Adapters are reported as ``adapters.<task>.adapters.<block>.{down,up}.*`` (ours); one that does
not exist yet is reported as zeros on both sides, so that its creation at the boundary is a
re-draw (``boundary/redrawn`` compares its distribution).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.tools.parity import TASK, BatchContext, Case, OurSide, Side, Step, batch_for, method_tensors, register_adapter
from benchmarks.tools.parity_pilot import (STEP_SEED, PilotAdapter, PilotRefSide, StopAtTraining, patched_create_model,
                                           their_data)

END_BATCH_SEED = 99  # the batch of task 1 whose end-of-task prototypes are compared


def adapter_tensor_names(task: int, depth: int) -> List[str]:
    return [f"adapters.{task}.adapters.{i}.{p}.{w}" for i in range(depth) for p in ("down", "up") for w in ("weight", "bias")]


class EASEOurSide(OurSide):
    """Ours, with adapters of tasks not begun yet shown as zeros, logits cut to the seen / the
    task's classes (the reference's heads have only those), and the end of task 1 in
    ``boundary_state``."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.method.begin_task(self.tasks[0])  # adapter 0 and the proxy head exist from task 0 on
        self.init = {n: p.detach().clone() for n, p in method_tensors(self.method).items()}
        self.depth = len(self.method.adapters[0].adapters)
        self.shapes = {n.split(".", 2)[2]: p.shape for n, p in method_tensors(self.method).items()
                       if n.startswith("adapters.0.")}
        self.batch = 2

    def tensors(self) -> Dict[str, Tensor]:
        out = super().tensors()
        for t in range(TASK + 1):
            for n in adapter_tensor_names(t, self.depth):
                out.setdefault(n, torch.zeros(self.shapes[n.split(".", 2)[2]]))
        return out

    def boundary_state(self) -> Dict[str, Tensor]:
        out = super().boundary_state()
        t1 = self.tasks[TASK]
        d = self.method.backbone.embed_dim
        out["buffer:prototypes"] = self.method.prototypes[: t1.class_end, : (TASK + 1) * d].detach().clone().double()
        # the end of task 1 on a batch of task 1, then undone (prototypes and requires_grad)
        m = self.method
        saved = m.prototypes.clone()
        flags = [p.requires_grad for p in m.adapters[TASK].parameters()]
        x, y = batch_for(self.num_classes, self.cfg.benchmark.num_tasks, TASK, self.batch, END_BATCH_SEED, self.image_size)
        m.end_task(t1, BatchContext(self, (x, y)))
        out["buffer:prototypes@end_of_task_1"] = m.prototypes[: t1.class_end, : (TASK + 1) * d].detach().clone().double()
        with torch.no_grad():  # the reweighted prediction (alpha / t off the diagonal) on that state
            out["buffer:logits@end_of_task_1"] = self.eval_logits(x).double()
        with torch.no_grad():
            m.prototypes.copy_(saved)
        for p, f in zip(m.adapters[TASK].parameters(), flags):
            p.requires_grad_(f)
        return out

    def eval_logits(self, x: Tensor) -> Tensor:
        return super().eval_logits(x)[:, : self.tasks[TASK].class_end]

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        torch.manual_seed(STEP_SEED)
        s = super().train_step(x, y)
        t = self.tasks[TASK]
        return Step(s.logits[:, t.class_start: t.class_end], s.losses, s.grads, s.after)


class EASERefSide(PilotRefSide):
    def __init__(self, ref_dir: str, args: Dict[str, Any], vit: nn.Module, ours: EASEOurSide,
                 num_classes: int, sizes: List[int], train_tf: List[Any], test_tf: List[Any]) -> None:
        self.ours, self.vit, self.args = ours, vit, args
        self.train_tf, self.test_tf = train_tf, test_tf
        _, lrn = self.build_learner("models.ease", args, vit, num_classes, sizes)
        self.lrn = lrn
        self.recorded: Dict[str, Any] = {}
        net = lrn._network
        # the proxy head of task 0 (update_fc makes it inside incremental_train); its values are
        # those the harness loads before the boundary
        fc0 = net.generate_fc(net.out_dim, sizes[0])
        self.proxy0 = {"weight": fc0.weight, "sigma": fc0.sigma}

        def init_train(train_loader, test_loader, optimizer, scheduler):  # stub: record, do not train
            if lrn._cur_task == 0:
                with torch.no_grad():
                    net.proxy_fc.weight.copy_(self.proxy0["weight"])
                    net.proxy_fc.sigma.copy_(self.proxy0["sigma"])
                return
            self.recorded.update(optimizer=optimizer, scheduler=scheduler)
            raise StopAtTraining  # the stubbed _init_train of task 1

        lrn._init_train = init_train
        self.depth = len(net.backbone.blocks)
        # as built: adapter 0 and the proxy head (later tasks' adapters do not exist yet)
        self.init = {n: v for n, v in self.tensors().items() if not n.startswith(f"adapters.{TASK}.")}

    # -- names ------------------------------------------------------------------------------
    def own(self) -> Dict[str, nn.Parameter]:
        net = self.lrn._network
        bb = net.backbone
        out: Dict[str, nn.Parameter] = {}
        adapters = list(bb.adapter_list) + [bb.cur_adapter]
        for t, mods in enumerate(adapters):
            for i, a in enumerate(mods):
                for p in ("down", "up"):
                    lin = getattr(a, f"{p}_proj")
                    out[f"adapters.{t}.adapters.{i}.{p}.weight"] = lin.weight
                    out[f"adapters.{t}.adapters.{i}.{p}.bias"] = lin.bias
        proxy = getattr(net, "proxy_fc", None)
        out["proxy.weight"] = proxy.weight if proxy is not None else self.proxy0["weight"]
        out["proxy.sigma"] = proxy.sigma if proxy is not None else self.proxy0["sigma"]
        return out

    def tensors(self) -> Dict[str, Tensor]:
        own = self.own()
        out = {n: p.detach().clone() for n, p in own.items()}
        for t in range(TASK + 1):
            for n in adapter_tensor_names(t, self.depth):
                out.setdefault(n, torch.zeros_like(own[n.replace(f"adapters.{t}.", "adapters.0.", 1)]))
        # trainable tensors of theirs that map to nothing of ours: shown (they would FAIL)
        for n, p in self.lrn._network.named_parameters():
            if p.requires_grad and not (".cur_adapter." in n or n.startswith("proxy_fc.") or n.startswith("fc.")):
                out[f"ref:{n}"] = p.detach().clone()
        return out

    # -- the boundary -----------------------------------------------------------------------
    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        if t == 0:
            return  # their task 0 runs at the boundary, when its batch is there
        from benchmarks.tools.refcompare import quiet

        self.data.batch = prev
        with patched_create_model(self.vit), quiet():
            self.lrn.incremental_train(self.data)  # task 0: stubbed training, replace_fc
            self.lrn.after_task()
            try:
                self.lrn.incremental_train(self.data)  # task 1, up to its training
            except StopAtTraining:
                pass

    def boundary_state(self) -> Dict[str, Tensor]:
        net = self.lrn._network
        opt = self.recorded["optimizer"]
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        out = {f"trained:{n}": torch.tensor(float(id(p) in in_opt)) for n, p in self.own().items()}
        out["buffer:prototypes"] = net.fc.weight.detach().clone().double()
        # the end of task 1 (see the module docstring), then undone; adapter 1 holds ours' values
        # meanwhile (the harness shares the tensors only after this)
        saved_fc = net.fc.weight.detach().clone()
        own = self.own()
        saved_ad = {n: p.detach().clone() for n, p in own.items() if n.startswith(f"adapters.{TASK}.")}
        ours = self.ours.tensors()
        x, y = batch_for(self.ours.num_classes, self.ours.cfg.benchmark.num_tasks, TASK, self.ours.batch,
                         END_BATCH_SEED, self.ours.image_size)
        self.data.batch = (x, y)
        self.lrn.train_dataset_for_protonet = self.data
        with torch.no_grad():
            for n in saved_ad:
                own[n].copy_(ours[n])
        self.lrn.replace_fc(self.data.loader())
        out["buffer:prototypes@end_of_task_1"] = net.fc.weight.detach().clone().double()
        with torch.no_grad():
            out["buffer:logits@end_of_task_1"] = self.eval_logits(x).double()
        with torch.no_grad():
            net.fc.weight.copy_(saved_fc)
            for n, v in saved_ad.items():
                own[n].copy_(v)
        return out

    # -- forward, step, schedule --------------------------------------------------------------
    def eval_logits(self, x: Tensor) -> Tensor:
        net = self.lrn._network
        net.eval()
        return net(x, test=True)["logits"]

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        lrn = self.lrn
        net = lrn._network
        opt = self.recorded["optimizer"]
        torch.manual_seed(STEP_SEED)
        # one iteration of their _init_train loop body
        net.train()
        aux = torch.where(y - lrn._known_classes >= 0, y - lrn._known_classes, -1)
        logits = net(x, test=False)["logits"]
        loss = F.cross_entropy(logits, aux)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return Step(logits.detach(), {"ce": loss.detach()}, self.grads(), self.tensors())

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        epochs = self.args["init_epochs"] if self.args["init_cls"] == self.args["increment"] else self.args["later_epochs"]
        return self.recorded_lrs(epochs)  # stepped once per epoch, as _init_train

    def steps_per_epoch(self, images: int) -> int:
        # their DataLoader(train_dataset, batch_size=args["batch_size"], shuffle=True): no drop_last
        return self.loader_steps(images, self.lrn.batch_size)


@register_adapter
class EASEAdapter(PilotAdapter):
    method = "ease"
    repo = "sun-hailong/CVPR24-Ease"
    deviations: Dict[str, str] = {}

    SPEC = {"cifar100": "exps/ease_cifar_in21k.json", "imagenet_r": "exps/ease_inr_in21k.json",
            "cub200": "exps/ease_cub_in21k.json"}

    ref_file = "models/ease.py"

    def cases(self) -> List[Case]:
        return [Case("paper", b, f, options={"json": f}) for b, f in self.SPEC.items()]

    def ours(self, case: Case, vit: nn.Module, seed: int = 0) -> Side:
        return EASEOurSide(self.method, self.config(case), vit, seed)

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        args = self.json_args(ref_dir, case)
        D = their_data()
        sizes = self.task_sizes(args, ours)
        return EASERefSide(ref_dir, args, vit, ours, ours.num_classes, sizes,  # type: ignore[arg-type,attr-defined]
                           D.build_transform(True, args), D.build_transform(False, args))

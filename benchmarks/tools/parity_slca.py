"""Parity adapter for SLCA (GengDavid/SLCA).

The reference side is their ``models/slca.SLCA`` learner built from ``exps/slca/slca_<dataset>.json``
and driven through its own ``incremental_train`` with a stand-in data manager:

* model: ``utils/inc_net.FinetuneIncrementalNet`` on ``convs/vits.py``'s
  ``vit_base_patch16_224_in21k`` (their ``build_model_with_cfg`` builds the model and loads our
  random ViT's tensors, timm names; their builder then replaces the final norm by a fresh
  ``nn.LayerNorm(768)``), heads ``convs/linears.SimpleContinualLinear``;
* boundary (task 0 -> 1): ``incremental_train`` of task 0 with ``_run`` (stage 1's loop) stubbed,
  ``fc.backup()`` and ``_compute_class_mean`` for real on a statistics batch of task 0 (2 images of
  every class: a covariance needs two), ``after_task`` (``fc.recall()``; checkpoint saving
  stubbed), then ``incremental_train`` of task 1 up to stage 1's loop (a new head, the old one
  frozen, the two-group SGD and MultiStepLR of task 1, recorded), where it stops;
* ``boundary_state``: which tensors the task-1 optimiser holds (``trained:*``), the class means and
  covariances of task 0's classes (``buffer:class_mean``, ``buffer:class_cov``: theirs include
  ``+1e-4·I``, which ours adds when sampling, so ours is reported with it);
* step: one iteration of their ``_run`` loop body (``logits[:, known:]``, CE on the task-local
  targets, the recorded SGD); lr: the recorded MultiStepLR stepped per epoch;
* compared tensors: the heads and a fixed subset of the trained backbone (``SELECTED``: 8 tensors,
  among them the fresh final norm), since every tensor of a ViT-B compared several times would not
  fit the machine.

* the end of task 1, computed inside ``boundary_state`` on a statistics batch of task 1 and undone
  afterwards on both sides: the statistics of every seen class, then stage 2, the classifier
  alignment, whose result (every head, ``buffer:<i>.weight@end_of_task_1``) is compared value for
  value: the draws are shared -- their ``MultivariateNormal(mean, cov).sample`` and
  ``torch.randperm`` are replaced, for that call, by the same float64 Cholesky draws from the same
  seeded generator as ours (the generator is a documented difference; what is compared is
  everything else: the shrunk means, the order of draws, the mini-batches, the logit-normalised
  loss, the optimiser and its cosine schedule, which heads train).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.tools.parity import (TASK, BatchContext, Case, OurSide, Side, Step, captured_forward, our_lrs,
                                    register_adapter)
from benchmarks.tools.parity_pilot import OwnTensors, PilotAdapter, PilotRefSide, StopAtTraining, cpu_shims, their_data

SELECTED = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "blocks.11.mlp.fc2.weight", "blocks.11.norm2.weight", "norm.weight", "norm.bias"]
STATS_PER_CLASS = 2  # images per class of the statistics batch (a covariance needs two)


def stats_batch(task_classes: range, size: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``STATS_PER_CLASS`` random images of every class of a task."""
    g = torch.Generator().manual_seed(seed + 7)
    y = torch.tensor([c for c in task_classes for _ in range(STATS_PER_CLASS)])
    return torch.rand(len(y), 3, size, size, generator=g), y


class SLCAOurSide(OwnTensors, OurSide):
    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.method.begin_task(self.tasks[0])
        t = self.tensors()
        self.init = {n: v for n, v in t.items() if n.startswith("heads.0.") or n.startswith("vit.norm.")}
        self.head_shape = {1: (self.tasks[1].class_end - self.tasks[1].class_start, self.method.backbone.embed_dim)}

    def own(self) -> Dict[str, nn.Parameter]:
        m = self.method
        out = {n: p for n, p in m.named_parameters() if n.startswith("heads.")}
        vit = dict(m.backbone.vit.named_parameters())
        out.update({f"vit.{n}": vit[n] for n in SELECTED})
        return out

    def tensors(self) -> Dict[str, Tensor]:
        out = {n: p.detach().clone() for n, p in self.own().items()}
        if "heads.1.weight" not in out:  # not created yet: zeros, as the reference side reports it
            out["heads.1.weight"] = torch.zeros(self.tasks[1].class_end - self.tasks[1].class_start, self.method.backbone.embed_dim)
            out["heads.1.bias"] = torch.zeros(self.tasks[1].class_end - self.tasks[1].class_start)
        return out

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        if t > 0:
            t0 = self.tasks[t - 1]
            batch = stats_batch(range(t0.class_start, t0.class_end), self.image_size)
            self.method.end_task(t0, BatchContext(self, batch))
        self.method.begin_task(self.tasks[t])

    def groups(self):
        phase = self.method.phases(self.tasks[TASK])[-1]
        return phase.param_groups if phase.param_groups is not None else self.method.param_groups()

    def boundary_state(self) -> Dict[str, Tensor]:
        trained = {id(p) for g in self.groups() for p in g["params"] if p.requires_grad}
        out = {f"trained:{n}": torch.tensor(float(id(p) in trained)) for n, p in self.own().items()}
        st = self.method.stats
        t0 = self.tasks[0]
        cls = range(t0.class_start, t0.class_end)
        out["buffer:class_mean"] = torch.stack([st.means[c][0] for c in cls]).double()
        eye = torch.eye(self.method.backbone.embed_dim, dtype=torch.float64)
        out["buffer:class_cov"] = torch.stack([st.spreads[c] + 1e-4 * eye for c in cls]).double()
        out.update(self.end_of_task_1())
        return out

    def end_of_task_1(self) -> Dict[str, Tensor]:
        """Our end of task 1 on its statistics batch (statistics, then the classifier alignment),
        reported and undone (heads, raw-head backup, statistics, flags)."""
        m, t1 = self.method, self.tasks[TASK]
        heads = {k: v.detach().clone() for k, v in m.heads.state_dict().items()}
        raw, log = m.raw_heads, list(m.align_log)
        means, spreads = dict(m.stats.means), dict(m.stats.spreads)
        flags = [p.requires_grad for p in m.heads.parameters()]
        m.end_task(t1, BatchContext(self, stats_batch(range(t1.class_start, t1.class_end), self.image_size, 1)))
        out = {f"buffer:{k}@end_of_task_1": v.detach().clone().double() for k, v in m.heads.state_dict().items()}
        out["buffer:class_mean@end_of_task_1"] = torch.stack([m.stats.means[c][0] for c in range(t1.class_end)]).double()
        with torch.no_grad():
            for k, v in m.heads.state_dict().items():
                v.copy_(heads[k])
        m.raw_heads, m.align_log = raw, log
        m.stats.means, m.stats.spreads = means, spreads
        for p, f in zip(m.heads.parameters(), flags):
            p.requires_grad_(f)
            p.grad = None  # the alignment's last gradients: the state before had none
        return out

    def eval_logits(self, x: Tensor) -> Tensor:
        return super().eval_logits(x)[:, : self.tasks[TASK].class_end]

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        from benchmarks.run.speed import TrainStep

        step = TrainStep(self.method, self.tasks[TASK], x, y, self.cfg.train)
        out = captured_forward(self.method, step)
        t = self.tasks[TASK]
        logits = out.logits.masked_fill(~step.mask, float("-inf"))
        losses = {"ce": F.cross_entropy(logits.float(), y).detach()}
        return Step(out.logits[:, : t.class_end].detach(), losses, self.grads(), self.tensors())

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        from benchmarks.run.protocol import phase_config

        tcfg = phase_config(self.cfg.train, self.method.phases(self.tasks[TASK])[-1])
        return our_lrs(self.groups(), tcfg, steps_per_epoch, self.own())


class Rows:
    """A dataset of the stand-in data manager: a batch (or one class of it)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    @property
    def labels(self) -> np.ndarray:
        return self.y.numpy()


def loader(ds: Any, *a: Any, **k: Any) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Their ``DataLoader(...)``: the dataset's rows as one batch, in order."""
    return [(torch.arange(len(ds.y)), ds.x, ds.y)] if len(ds.y) else []


class StandInData:
    def __init__(self, name: str, sizes: List[int]) -> None:
        self.dataset_name, self.sizes = name, sizes
        self.batch: Optional[Tuple[Tensor, Tensor]] = None

    def get_task_size(self, t: int) -> int:
        return self.sizes[t]

    def get_dataset(self, indices: Any, source: str, mode: str, appendent: Any = None, with_raw: bool = False,
                    ret_data: bool = False) -> Any:
        x, y = self.batch if self.batch is not None else (torch.zeros(0, 3, 224, 224), torch.zeros(0, dtype=torch.long))
        keep = torch.from_numpy(np.isin(y.numpy(), np.asarray(indices)))
        ds = Rows(x[keep], y[keep])
        return (ds.x, ds.labels, ds) if ret_data else ds


class SLCARefSide(PilotRefSide):
    def __init__(self, ref_dir: str, args: Dict[str, Any], vit: nn.Module, ours: SLCAOurSide, sizes: List[int],
                 train_tf: List[Any], test_tf: List[Any]) -> None:
        cpu_shims()
        import importlib
        import sys

        import timm.layers.weight_init as weight_init

        from benchmarks.tools.refcompare import load_vit_weights, quiet, timm06_shim

        sys.modules.setdefault("timm.models.layers.weight_init", weight_init)  # timm 0.5's path (convs/linears.py)

        timm06_shim()
        import convs.vits as V  # type: ignore

        def build(model_cls, variant, pretrained, default_cfg=None, pretrained_filter_fn=None,
                  pretrained_custom_load=False, **kw):  # their build, with our random ViT's tensors
            model = model_cls(**kw)
            load_vit_weights(model, vit)
            return model

        V.build_model_with_cfg = build
        self.ours, self.args, self.sizes = ours, args, sizes
        self.train_tf, self.test_tf = train_tf, test_tf
        mod = importlib.import_module("models.slca")
        base = importlib.import_module("models.base")
        mod.DataLoader = base.DataLoader = loader
        with quiet():
            lrn = mod.SLCA(args)
        lrn.save_checkpoint = lambda *a, **k: None
        lrn._compute_accuracy = lambda *a, **k: 0.0
        self.lrn = lrn
        self.data = StandInData(args["dataset"], sizes)
        self.recorded: Dict[str, Any] = {}

        def run(train_loader, test_loader, optimizer, scheduler):  # stub of stage 1's loop
            if lrn._cur_task == 0:
                with torch.no_grad():  # task 0's head holds what the harness loaded
                    lrn._network.fc.heads[0][0].weight.copy_(self.head0["weight"])
                    lrn._network.fc.heads[0][0].bias.copy_(self.head0["bias"])
                return
            self.recorded.update(optimizer=optimizer, scheduler=scheduler)
            raise StopAtTraining

        lrn._run = run
        net = lrn._network
        head = net.generate_fc(net.feature_dim, sizes[0]).heads[0][0]  # task 0's head, as update_fc makes it
        self.head0 = {"weight": head.weight, "bias": head.bias}
        self.init = {n: v for n, v in self.tensors().items() if n.startswith("heads.0.") or n.startswith("vit.norm.")}

    def own(self) -> Dict[str, nn.Parameter]:
        net = self.lrn._network
        conv = dict(net.convnet.named_parameters())
        out = {f"vit.{n}": conv[n] for n in SELECTED}
        if net.fc is None:
            out["heads.0.weight"], out["heads.0.bias"] = self.head0["weight"], self.head0["bias"]
        else:
            for i, h in enumerate(net.fc.heads):
                out[f"heads.{i}.weight"], out[f"heads.{i}.bias"] = h[0].weight, h[0].bias
        return out

    def tensors(self) -> Dict[str, Tensor]:
        out = {n: p.detach().clone() for n, p in self.own().items()}
        if "heads.1.weight" not in out:
            out["heads.1.weight"] = torch.zeros(self.sizes[1], out["heads.0.weight"].shape[1])
            out["heads.1.bias"] = torch.zeros(self.sizes[1])
        return out

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        if t == 0:
            return
        from benchmarks.tools.refcompare import quiet

        o = self.ours
        t0 = o.tasks[0]
        self.data.batch = stats_batch(range(t0.class_start, t0.class_end), o.image_size)
        with quiet():
            self.lrn.incremental_train(self.data)
            self.lrn.after_task()
            try:
                self.lrn.incremental_train(self.data)
            except StopAtTraining:
                pass

    def boundary_state(self) -> Dict[str, Tensor]:
        opt = self.recorded["optimizer"]
        in_opt = {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad}
        out = {f"trained:{n}": torch.tensor(float(id(p) in in_opt)) for n, p in self.own().items()}
        n0 = self.sizes[0]
        out["buffer:class_mean"] = torch.as_tensor(self.lrn._class_means[:n0]).double()
        out["buffer:class_cov"] = self.lrn._class_covs[:n0].double()
        out.update(self.end_of_task_1())
        return out

    def end_of_task_1(self) -> Dict[str, Tensor]:
        """Their end of task 1 (``fc.backup``, ``_compute_class_mean``, ``_stage2_compact_classifier``)
        on the statistics batch of task 1, with the draws shared (see the module docstring),
        reported and undone."""
        import models.slca as S  # type: ignore

        lrn, net, o = self.lrn, self.lrn._network, self.ours
        t1 = o.tasks[TASK]
        saved_fc = {k: v.detach().clone() for k, v in net.fc.state_dict().items()}
        flags = [p.requires_grad for p in net.fc.parameters()]
        means, covs = lrn._class_means.copy(), lrn._class_covs.clone()
        self.data.batch = stats_batch(range(t1.class_start, t1.class_end), o.image_size, 1)
        gen = torch.Generator().manual_seed(0)  # what our end_task's ctx.generator gives in parity
        orig_mvn, orig_randperm = S.MultivariateNormal, torch.randperm

        class SharedNormal:  # their MultivariateNormal(mean, cov).sample, drawing ours
            def __init__(self, mean: Tensor, cov: Tensor) -> None:
                self.mean, self.chol = mean.double(), torch.linalg.cholesky(cov.double())

            def sample(self, sample_shape: Tuple[int, ...]) -> Tensor:
                z = torch.randn(sample_shape[0], self.mean.shape[0], generator=gen, dtype=torch.float64)
                return (self.mean + z @ self.chol.T).float()

        def randperm(n: int, *a: Any, **k: Any) -> Tensor:
            k.setdefault("generator", gen)
            return orig_randperm(n, *a, **k)

        # the heads hold ours' values meanwhile (the harness shares the tensors only after this;
        # the head of task 1 was drawn on each side)
        self.set_tensors({n: v for n, v in o.tensors().items() if n.startswith("heads.")})
        S.MultivariateNormal, torch.randperm = SharedNormal, randperm
        try:
            net.fc.backup()
            lrn._compute_class_mean(self.data, check_diff=False, oracle=False)
            lrn._stage2_compact_classifier(self.sizes[TASK])
        finally:
            S.MultivariateNormal, torch.randperm = orig_mvn, orig_randperm
        out = {}
        for i, h in enumerate(net.fc.heads):
            out[f"buffer:{i}.weight@end_of_task_1"] = h[0].weight.detach().clone().double()
            out[f"buffer:{i}.bias@end_of_task_1"] = h[0].bias.detach().clone().double()
        out["buffer:class_mean@end_of_task_1"] = torch.as_tensor(lrn._class_means[: t1.class_end]).double()
        with torch.no_grad():
            net.fc.load_state_dict(saved_fc)
        for p, f in zip(net.fc.parameters(), flags):
            p.requires_grad_(f)
            p.grad = None  # the alignment's last gradients: the state before had none
        lrn._class_means, lrn._class_covs = means, covs
        return out

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        lrn, net = self.lrn, self.lrn._network
        opt = self.recorded["optimizer"]
        net.train()  # one iteration of their _run loop body
        logits = net(x, bcb_no_grad=lrn.fix_bcb)["logits"]
        cur = torch.where(y - lrn._known_classes >= 0, y - lrn._known_classes, -100)
        loss = F.cross_entropy(logits[:, lrn._known_classes:], cur)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return Step(logits.detach(), {"ce": loss.detach()}, self.grads(), self.tensors())

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        import models.slca as S  # type: ignore

        return self.recorded_lrs(S.epochs)  # their _run: epochs 1..E, scheduler stepped after each

    def steps_per_epoch(self, images: int) -> int:
        import models.slca as S  # type: ignore

        # DataLoader(train_dset, batch_size=batch_size (128), shuffle=True): no drop_last
        return self.loader_steps(images, S.batch_size)


@register_adapter
class SLCAAdapter(PilotAdapter):
    method = "slca"
    repo = "GengDavid/SLCA"
    deviations: Dict[str, str] = {}

    SPEC = {"cifar100": ("exps/slca/slca_cifar.json", "iCIFAR100_224"),
            "imagenet_r": ("exps/slca/slca_imgnetr.json", "iImageNetR"),
            "cub200": ("exps/slca/slca_cub.json", "iCUB200_224")}

    ref_file = "models/slca.py"

    def cases(self) -> List[Case]:
        return [Case("paper", b, f, options={"json": f, "data": d}) for b, (f, d) in self.SPEC.items()]

    def ours(self, case: Case, vit: nn.Module, seed: int = 0) -> Side:
        cfg = self.config(case)
        # our SLCA trains the backbone and replaces its final norm: on a copy, so that the
        # reference (which loads the shared ViT) and later cases start from the same weights
        return SLCAOurSide(self.method, cfg, copy.deepcopy(vit), seed)

    def reference(self, case: Case, ref_dir: str, vit: nn.Module, ours: Side, seed: int = 0) -> Side:
        args = self.json_args(ref_dir, case)
        args.update(seed=args["seed"][0], run_id=0)
        d = getattr(their_data(), case.options["data"])
        sizes = self.task_sizes(args, ours)
        return SLCARefSide(ref_dir, args, vit, ours, sizes,  # type: ignore[arg-type]
                           [*d.train_trsf, *d.common_trsf], [*d.test_trsf, *d.common_trsf])

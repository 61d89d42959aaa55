"""Side-by-side speed of one method against its public reference implementation, in one process.

Usage (one method per process: the reference repositories all have top-level modules called
``models``, ``utils``, ``engine`` ... that would collide)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.tools.refcompare --method smope --ref-dir /tmp/refs/smope

``--ref-dir`` is a local checkout of the reference repository (``git archive`` of its HEAD; see
docs/speed.md for the commits measured). This file contains only the harness: it imports the
reference's own modules from that checkout and calls its own model builders and training-step
functions; nothing of the references is copied here and nothing of them is committed.

What is timed, ViT-B/16, fp32, CPU, one batch of random images (identical for both sides), both
backbones holding the *same* random weights (ours are loaded into the reference's ViT by name):

* training step -- ours: :class:`benchmarks.run.speed.TrainStep` (query pass, prompted forward, loss,
  backward, optimiser step over the phase's parameters); the reference: the function its main
  script calls for one batch (``engine.train_one_epoch`` over a one-batch loader for the
  JH-LEE-KR code bases, ``learner.update_model`` for CODA-Prompt / SMoPE), i.e. its query pass,
  forward, loss, backward and optimiser step over the parameters its code optimises;
* inference batch -- ours: :class:`benchmarks.run.speed.InferBatch` with every pass (no cache); the
  reference: its evaluation forward (``engine.evaluate`` on one batch / ``learner.predict``).

Both run at the second task (task index 1) of 10-task Split CIFAR-100, interleaved by
:func:`benchmarks.run.speed.time_alternating`, single-threaded; the figure compared is the median
process CPU time per call, which does not depend on how long other processes held the cores.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # run as a script: one OpenMP thread (must precede the first torch import)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import importlib
import io
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

NUM_CLASSES, NUM_TASKS, TASK = 100, 10, 1
PER_TASK = NUM_CLASSES // NUM_TASKS


@dataclass
class Side:
    """The timed callables of one side, plus what the report says about it."""
    train: Callable[[], Any]
    infer: Callable[[], Any]
    trainable: List[nn.Parameter]
    all_params: List[nn.Parameter]
    notes: Dict[str, Any] = field(default_factory=dict)


# --- our side ------------------------------------------------------------------------------

OURS = {"l2p": "l2p", "dualprompt": "dualprompt", "coda": "coda_prompt", "smope": "smope", "hide": "hide_prompt"}


def our_side(method: str, vit: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Side:
    """Our method with its ``paper`` preset for CIFAR-100 on the random ViT ``vit``, in task 1."""
    from benchmarks.tables.cost_table import build_method, make_tasks, resolve_method_config
    from benchmarks.run.speed import InferBatch, TrainStep
    from methods.vit import PromptedViT

    name = OURS[method]
    cfg, _ = resolve_method_config(name, "cifar100", "paper", {})
    m = build_method(name, cfg, PromptedViT(vit), NUM_CLASSES, NUM_TASKS)
    tasks = make_tasks(NUM_CLASSES, NUM_TASKS)
    for t in tasks[: TASK + 1]:
        m.begin_task(t)
    task = tasks[TASK]
    step = TrainStep(m, task, x, y, cfg.train)
    return Side(step, InferBatch(m, x), step.params, list(m.parameters()),
                {"phase": step.phase.name, "optimizer": type(step.opt).__name__})


# --- reference side: JH-LEE-KR code bases (L2P, DualPrompt) ---------------------------------

# create_model keyword -> argument name, as their main.py passes them (each code base has a subset)
JHLEE_MODEL_KWARGS = ["prompt_length:length", "embedding_key", "prompt_init:prompt_key_init", "prompt_pool",
                      "prompt_key", "pool_size:size", "top_k", "batchwise_prompt", "prompt_key_init", "head_type",
                      "use_prompt_mask", "use_g_prompt", "g_prompt_length", "g_prompt_layer_idx",
                      "use_prefix_tune_for_g_prompt", "use_e_prompt", "e_prompt_layer_idx",
                      "use_prefix_tune_for_e_prompt", "same_key_value"]


def quiet():
    """The references print progress and statistics on every call; keep the report readable."""
    return contextlib.redirect_stdout(io.StringIO())


def timm06_shim() -> None:
    """The JH-LEE-KR / HiDe code pins timm 0.6.7, whose ``resolve_pretrained_cfg`` returned a dict
    and whose ``build_model_with_cfg`` took ``pretrained_custom_load``; under timm 1.x their
    ``_create_vision_transformer`` fails on both. With random weights (``pretrained=False``) building
    the model is only calling their ``VisionTransformer`` with the keyword arguments, which is what
    these two stand-ins do (installed into ``timm.models.helpers`` before their modules import it)."""
    import timm.models.helpers as helpers

    def resolve_pretrained_cfg(variant, pretrained_cfg=None, **_):
        return {"url": ""}

    def build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=None, pretrained_filter_fn=None,
                             pretrained_custom_load=False, **kwargs):
        if pretrained:
            raise SystemExit("the speed comparison uses random weights (pretrained=False)")
        for k in ("pretrained_cfg_overlay", "cache_dir"):  # timm 1.x create_model adds these
            kwargs.pop(k, None)
        return model_cls(**kwargs)

    helpers.resolve_pretrained_cfg = resolve_pretrained_cfg
    helpers.build_model_with_cfg = build_model_with_cfg


def jhlee_args(config: str, extra: Sequence[str] = ()) -> argparse.Namespace:
    """The arguments ``main.py`` of a JH-LEE-KR-style code base (L2P, DualPrompt, HiDe-Prompt) parses
    for ``configs/<config>.py`` plus ``extra``, set for one CPU process without pretrained weights."""
    cfgmod = importlib.import_module(f"configs.{config}")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="subparser_name")
    cfgmod.get_args_parser(sub.add_parser(config))
    args = parser.parse_args([config, *extra])
    args.device, args.distributed, args.nb_classes, args.pretrained = "cpu", False, NUM_CLASSES, False
    args.print_freq = 10 ** 9
    return args


def jhlee_models(args: argparse.Namespace, vit: nn.Module, original_name: str,
                 **original_kwargs: Any) -> Tuple[nn.Module, nn.Module, int]:
    """The frozen original (query) model and the prompted model, built by ``timm.create_model`` as
    those ``main.py`` scripts build them, both holding ``vit``'s weights, with ``args.freeze``
    applied. Returns ``(original, model, number of weights loaded)``."""
    from timm.models import create_model

    common = dict(pretrained=False, num_classes=NUM_CLASSES, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  drop_block_rate=None)
    original = create_model(original_name, **common, **original_kwargs)
    kwargs = {}
    for item in JHLEE_MODEL_KWARGS:
        kw, _, attr = item.partition(":")
        if hasattr(args, attr or kw):
            kwargs[kw] = getattr(args, attr or kw)
    model = create_model(args.model, **common, **kwargs)
    shared = load_vit_weights(original, vit) + load_vit_weights(model, vit)
    for p in original.parameters():
        p.requires_grad = False
    for n, p in model.named_parameters():
        if n.startswith(tuple(args.freeze)):
            p.requires_grad = False
    return original, model, shared


def jhlee_side(config: str, vit: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Side:
    """L2P / DualPrompt (JH-LEE-KR): the argument defaults of ``configs/<config>.py``, models made
    by ``timm.create_model`` as ``main.py`` makes them (a frozen original model for the query, the
    prompted model with ``args.freeze`` applied), ``timm.optim.create_optimizer``; one step is
    ``engine.train_one_epoch`` over a one-batch loader."""
    from timm.optim import create_optimizer

    timm06_shim()
    args = jhlee_args(config)
    importlib.import_module("models")  # registers their vit_base_patch16_224 in timm's registry
    engine = importlib.import_module("engine")
    original, model, shared = jhlee_models(args, vit, args.model)
    optimizer = create_optimizer(args, model)
    criterion = nn.CrossEntropyLoss()
    class_mask = [list(range(t * PER_TASK, (t + 1) * PER_TASK)) for t in range(NUM_TASKS)]
    cpu = torch.device("cpu")

    def train():
        with quiet():
            return engine.train_one_epoch(model, original, criterion, [(x, y)], optimizer, cpu, 0, args.clip_grad,
                                          True, TASK, class_mask, args)

    def infer():
        with quiet():
            return engine.evaluate(model, original, [(x, y)], cpu, TASK, class_mask, args)

    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return Side(train, infer, trainable, list(model.parameters()) + list(original.parameters()),
                {"config": config, "optimizer": type(optimizer).__name__, "weights_loaded": shared})


def hide_side(vit: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Side:
    """HiDe-Prompt (thu-ml), prompt stage (WTP + TAP run of ``training_scripts/train_cifar100_vit.sh``:
    ``--length 5 --larger_prompt_lr --sched step --prompt_momentum 0.01 --reg 0.1``): the original
    model with its TII MLP head (``mlp_structure``) picks the prompt, ``trainers/hideprompt_trainer.py``
    builds both models and the two-group optimiser; one step is
    ``engines/hide_promtp_wtp_and_tap_engine.train_one_epoch`` over a one-batch loader."""
    from timm.optim import create_optimizer

    timm06_shim()
    config = "cifar100_hideprompt_5e"
    args = jhlee_args(config, ["--length", "5", "--larger_prompt_lr", "--sched", "step", "--prompt_momentum", "0.01",
                               "--reg", "0.1", "--model", "vit_base_patch16_224", "--original_model", "vit_base_patch16_224"])
    importlib.import_module("vits.hide_prompt_vision_transformer")  # registers their ViT builders
    engine = importlib.import_module("engines.hide_promtp_wtp_and_tap_engine")
    original, model, shared = jhlee_models(args, vit, args.original_model,
                                           mlp_structure=args.original_model_mlp_structure)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "prompt" in n], "lr": args.lr, "weight_decay": args.weight_decay},
              {"params": [p for n, p in named if "prompt" not in n], "lr": args.lr * 0.1,
               "weight_decay": args.weight_decay}]
    optimizer = create_optimizer(args, groups)
    criterion = nn.CrossEntropyLoss()
    class_mask = [list(range(t * PER_TASK, (t + 1) * PER_TASK)) for t in range(NUM_TASKS)]
    target_task_map = {c: t for t in range(NUM_TASKS) for c in class_mask[t]}
    # the engine's module-global class means, which train_and_evaluate fills after each task (the
    # contrastive regulariser in train_one_epoch reads them): task 0's 10 classes, random values
    engine.cls_mean = {c: torch.randn(model.embed_dim) for c in class_mask[0]}
    cpu = torch.device("cpu")

    def train():
        with quiet():
            return engine.train_one_epoch(model, original, criterion, [(x, y)], optimizer, cpu, 0, args.clip_grad,
                                          True, TASK, class_mask, target_task_map, args)

    def infer():
        with quiet():
            return engine.evaluate(model, original, [(x, y)], cpu, TASK, TASK, class_mask, target_task_map, args)

    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return Side(train, infer, trainable, list(model.parameters()) + list(original.parameters()),
                {"config": config, "optimizer": type(optimizer).__name__, "weights_loaded": shared})


# --- reference side: GT-RIPL learner code bases (CODA-Prompt, SMoPE) ------------------------

def learner_side(learner: str, prompt_param: List[float], config_yaml: str, vit: nn.Module,
                 x: torch.Tensor, y: torch.Tensor) -> Side:
    """CODA-Prompt / SMoPE: ``learners.prompt.<learner>`` built from the learner config that
    ``trainer.py`` assembles (values from ``configs/<yaml>`` and ``experiments/*.sh``), advanced to
    task 1 as ``trainer.py`` does (``task_id``, valid output dims, ``process_task_count``, a fresh
    optimiser); one step is ``learner.update_model``."""
    import yaml

    learners = importlib.import_module("learners")
    with open(config_yaml) as f:
        c = yaml.safe_load(f)
    tasks = [list(range(t * PER_TASK, (t + 1) * PER_TASK)) for t in range(NUM_TASKS)]
    config = {"num_classes": NUM_CLASSES, "lr": c["lr"], "debug_mode": False, "momentum": c["momentum"],
              "weight_decay": c["weight_decay"], "schedule": c["schedule"], "schedule_type": c["schedule_type"],
              "iter_step": c.get("iter_step", 0), "model_type": c["model_type"], "model_name": c["model_name"],
              "optimizer": c["optimizer"], "gpuid": [-1], "memory": 0, "temp": 2.0, "out_dim": NUM_CLASSES,
              "overwrite": False, "DW": False, "batch_size": c["batch_size"], "upper_bound_flag": False,
              "tasks": tasks, "top_k": 1, "prompt_param": [NUM_TASKS, prompt_param], "pretrained_weight": None}
    with quiet():
        lrn = learners.prompt.__dict__[learner](config)
    shared = load_vit_weights(lrn.model.feat, vit)
    with quiet():
        for t in range(TASK + 1):
            lrn.model.task_id = t
            lrn.last_valid_out_dim = lrn.valid_out_dim
            lrn.add_valid_output_dim(PER_TASK)
            if t > 0:
                lrn.model.prompt.process_task_count()
        lrn.init_optimizer()
    # data_weighting() would move its weights to CUDA unconditionally; its CPU value is all ones
    lrn.dw_k = torch.ones(lrn.valid_out_dim + 1)

    def train():
        lrn.model.train()
        return lrn.update_model(x, y)

    def infer():
        return lrn.predict(x)

    trainable = [p for g in lrn.optimizer.param_groups for p in g["params"]]
    return Side(train, infer, trainable, list(lrn.model.parameters()),
                {"learner": learner, "prompt_param": prompt_param, "optimizer": type(lrn.optimizer).__name__,
                 "weights_loaded": shared})


# --- shared helpers -------------------------------------------------------------------------

def load_vit_weights(model: nn.Module, vit: nn.Module) -> int:
    """Copy the tensors of our random ViT into ``model`` where names and shapes agree; returns
    how many were copied (the references' ViTs use timm's parameter names)."""
    own = model.state_dict()
    src = {k: v for k, v in vit.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(src, strict=False)
    return len(src)


def count(params: List[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def grad_audit(side: Side) -> Dict[str, int]:
    """After a step: parameters with a gradient, and those of them the optimiser never updates
    (the gradient of a weight the method keeps frozen, computed for nothing)."""
    opt_ids = {id(p) for p in side.trainable}
    uniq = {id(p): p for p in side.all_params}.values()
    with_grad = [p for p in uniq if p.grad is not None]
    return {"optimised": count(side.trainable), "with_grad": count(with_grad),
            "grad_not_optimised": count([p for p in with_grad if id(p) not in opt_ids])}


def reference_side(method: str, ref_dir: str, vit: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Side:
    sys.path.insert(0, os.path.abspath(ref_dir))
    if not torch.cuda.is_available():
        # CPU shims: their train loops call torch.cuda.synchronize() and their prompt losses are
        # made with .cuda() unconditionally; on a CPU-only machine both become no-ops
        torch.cuda.synchronize = lambda *a, **k: None
        torch.Tensor.cuda = lambda self, *a, **k: self.clone()  # a copy, as on a GPU (a non-leaf)
    if method == "l2p":
        return jhlee_side("cifar100_l2p", vit, x, y)
    if method == "dualprompt":
        return jhlee_side("cifar100_dualprompt", vit, x, y)
    if method == "coda":  # experiments/cifar-100.sh: --prompt_param 100 8 0.0
        # models/zoo.py downloads timm's pretrained ViT-B/16 to initialise its own ViT; offline,
        # build it with random weights (ours are loaded over them right after)
        import timm.models
        builder = timm.models.vit_base_patch16_224
        timm.models.vit_base_patch16_224 = lambda pretrained=False, **kw: builder(pretrained=False, **kw)
        return learner_side("CODAPrompt", [100, 8, 0.0], os.path.join(ref_dir, "configs/cifar-100_prompt.yaml"),
                            vit, x, y)
    if method == "smope":  # experiments/cifar-100.sh: --prompt_param 50 5 1e-5 1e-5 0.4
        return learner_side("OnePrompt", [50, 5, 1e-5, 1e-5, 0.4],
                            os.path.join(ref_dir, "configs/cifar-100_prompt_smope.yaml"), vit, x, y)
    if method == "hide":
        return hide_side(vit, x, y)
    raise SystemExit(f"no reference adapter for '{method}'")


def summary(times: Dict[str, Dict[str, List[float]]], images: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for side, t in times.items():
        out[side] = {k: round(statistics.median(v), 4) for k, v in t.items()}
        out[side]["img_s_cpu"] = round(images / statistics.median(t["cpu"]), 3)
        out[side]["img_s_wall"] = round(images / statistics.median(t["wall"]), 3)
    out["speedup_cpu"] = round(statistics.median(times["reference"]["cpu"]) / statistics.median(times["ours"]["cpu"]), 3)
    out["speedup_wall"] = round(statistics.median(times["reference"]["wall"]) / statistics.median(times["ours"]["wall"]), 3)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=sorted(OURS))
    ap.add_argument("--ref-dir", help="local checkout of the reference repository")
    ap.add_argument("--table", metavar="JSONL", help="print the markdown table of the results in JSONL and exit")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--infer-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    a = ap.parse_args(argv)
    if a.table:
        with open(a.table) as f:
            print(markdown_table([json.loads(line) for line in f if line.strip()]))
        return 0
    if not (a.method and a.ref_dir):
        ap.error("--method and --ref-dir are required")

    from benchmarks.tables.cost_table import random_backbone
    from benchmarks.run.speed import time_alternating

    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    # our ViT first: importing a JH-LEE-KR code base re-registers timm's vit_base_patch16_224
    vit = random_backbone("vit_base_patch16_224", seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, 3, 224, 224, generator=g)
    y = torch.randint(TASK * PER_TASK, (TASK + 1) * PER_TASK, (a.batch,), generator=g)
    torch.manual_seed(0)
    ours = our_side(a.method, vit, x, y)
    torch.manual_seed(0)
    ref = reference_side(a.method, a.ref_dir, vit, x, y)
    log = lambda s: print("  " + s, file=sys.stderr, flush=True)  # noqa: E731
    train = time_alternating({"ours": ours.train, "reference": ref.train}, a.repeats, warmup=1, log=log)
    audit = {"ours": grad_audit(ours), "reference": grad_audit(ref)}
    infer = time_alternating({"ours": ours.infer, "reference": ref.infer}, a.infer_repeats, warmup=1, log=log)
    result = {
        "method": a.method, "batch": a.batch, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
        "cpu": cpu_name(), "platform": platform.platform(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "ours_notes": ours.notes, "ref_notes": ref.notes,
        "grads": audit, "train": summary(train, a.batch), "infer": summary(infer, a.batch),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


def markdown_table(results: List[Dict[str, Any]]) -> str:
    """One row per result: median CPU seconds per batch and images/s of both sides, the ratio."""
    head = ("| method | train s/batch ours | ref | train img/s ours | ref | **train ratio** | infer s/batch ours | ref "
            "| **infer ratio** | ref grads on weights it does not optimise |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        t, i, g = r["train"], r["infer"], r["grads"]["reference"]
        lines.append(f"| {r['method']} | {t['ours']['cpu']:.2f} | {t['reference']['cpu']:.2f} | {t['ours']['img_s_cpu']:.2f} "
                     f"| {t['reference']['img_s_cpu']:.2f} | **{t['speedup_cpu']:.2f}x** | {i['ours']['cpu']:.2f} "
                     f"| {i['reference']['cpu']:.2f} | **{i['speedup_cpu']:.2f}x** | {g['grad_not_optimised'] / 1e6:.1f} M |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())

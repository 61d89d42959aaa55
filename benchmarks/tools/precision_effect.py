"""How far bf16 autocast moves a method's logits from fp32 (the reference codes' precision).

``python -m benchmarks.tools.precision_effect [-m l2p,coda_prompt] [--batch 4] [--device cpu]`` builds
each method with its ``paper`` preset for 10-task CIFAR-100 on a randomly initialised ViT-B/16
(``backbone.pretrained: none``, one init seed for all), puts it in task 1, and runs the same batch
of random [0,1] images in eval mode once in fp32 and once under bf16 autocast (CPU autocast works
too). It prints, per method, the max and mean |Δlogit| and the fraction of samples whose argmax
over the seen classes changes. The numbers are in docs/speed.md ("Precision").
"""
from __future__ import annotations

import argparse
from typing import Dict, List

import torch

from benchmarks.config import resolve_config
from methods.backbones import create_backbone
from methods.base import Task
from methods.registry import create_method

DEFAULT_METHODS = ("l2p", "dualprompt", "coda_prompt", "hide_prompt", "smope", "vq_prompt")


@torch.no_grad()
def logit_difference(method_name: str, batch: int = 4, device: str = "cpu", seed: int = 0) -> Dict[str, float]:
    """max / mean |logits_bf16 − logits_fp32| and argmax flips over the 20 seen classes of task 1."""
    cfg = resolve_config(method_name, "cifar100", "paper")
    cfg.backbone.pretrained = "none"
    backbone, _ = create_backbone(cfg.backbone, init_seed=seed)
    torch.manual_seed(seed)
    method = create_method(method_name, backbone, 100, cfg.method, num_tasks=10).to(device).eval()
    offsets = list(range(0, 101, 10))
    for t in range(2):  # task 1: two tasks' classes seen, task-1 prompts allocated
        method.begin_task(Task(t, 10, offsets[t], offsets[t + 1], offsets))
    method.eval()
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).to(device)

    def logits(amp: bool) -> torch.Tensor:
        dev = torch.device(device).type
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=amp):
            q = method.backbone.query(x).float() if method.uses_query else None
            return method(x, query=q).logits.float()[:, :20]

    a, b = logits(False), logits(True)
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "logit_std": float(a.std()),
            "argmax_flips": float((a.argmax(1) != b.argmax(1)).float().mean())}


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    print("| method | max abs diff | mean abs diff | std of fp32 logits | argmax flips |")
    print("|---|---|---|---|---|")
    for name in args.methods.split(","):
        r = logit_difference(name, args.batch, args.device)
        print(f"| {name} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['logit_std']:.2e} | {r['argmax_flips']:.2f} |")


if __name__ == "__main__":
    main()

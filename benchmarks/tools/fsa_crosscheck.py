"""Numerical cross-check of the issue-22 building blocks against the authors' own modules.

A fast complement to the full ``bench.py parity`` adapters (benchmarks/tools/parity_{ranpac,aper,ease,slca}.py):
this imports the reference repositories' modules at run time from local checkouts and compares,
on small random models, the pieces the suite re-implements:

* RanPAC ``petl/vision_transformer_adapter.py`` ``Block`` vs :class:`methods.peft.AdapterPEFT`
  on a timm block (same weights, q/k/v split from timm's fused qkv);
* RanPAC ``petl/vpt.py`` ``VPT_ViT`` (Deep and Shallow) vs :class:`methods.peft.VPTPEFT`;
* RanPAC ``petl/vision_transformer_ssf.py`` ``VisionTransformer(tuning_mode='ssf')`` vs
  :class:`methods.peft.SSFPEFT` (parameter count and features);
* RanPAC ``RanPAC.py`` ``Learner.optimise_ridge_parameter`` vs :func:`methods.ranpac.choose_ridge`
  and the solve;
* CVPR24-Ease ``models/ease.py`` ``Learner.solve_sim_reset`` and ``backbone/linears.py``
  ``CosineLinear.forward_reweight`` vs :func:`methods.ease.complement_prototypes` and
  :func:`methods.ease.reweight_logits`.

Usage: ``python -m benchmarks.tools.fsa_crosscheck --ranpac /path/to/RanPAC --ease /path/to/CVPR24-Ease``.
Shims (for timm >= 1.0 and a missing ``easydict``) are installed in ``sys.modules`` only for this
process. Exit status 0 when every row passes, 1 otherwise, 2 for a missing checkout.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
import sys
import types
import warnings
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

TOL = 1e-5


def _shims() -> None:
    import timm.layers.helpers as helpers

    sys.modules.setdefault("timm.models.layers.helpers", helpers)
    sys.modules.setdefault("easydict", types.SimpleNamespace(EasyDict=dict))
    warnings.filterwarnings("ignore", category=FutureWarning)


def _small_vit(depth: int = 2):
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4, num_classes=0)
    return VisionTransformer(**kw), kw


def adapter_rows(ranpac: str) -> List[Tuple[str, float]]:
    from petl.vision_transformer_adapter import Block as RefBlock  # type: ignore

    from methods.peft import AdapterPEFT
    from methods.vit import PromptedViT

    vit, kw = _small_vit()
    pv = PromptedViT(vit)
    ours = AdapterPEFT(pv, bottleneck=8).eval()
    for a in ours.adapters:  # non-zero up projections, so the adapter path is exercised
        a.up.weight.data.normal_()
        a.up.bias.data.normal_()
    d, h = kw["embed_dim"], kw["num_heads"]
    cfg = types.SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_num=8, ffn_adapter_init_option="lora",
                                ffn_adapter_scalar="0.1", ffn_adapter_layernorm_option="none", d_model=d, attn_bn=8)
    x = torch.randn(2, 17, d)
    rows = []
    for i, blk in enumerate(vit.blocks):
        ref = RefBlock(d, h, qkv_bias=True, config=cfg).eval()
        sd = {}
        w, b = blk.attn.qkv.weight.data, blk.attn.qkv.bias.data
        for j, n in enumerate("qkv"):
            sd[f"attn.{n}_proj.weight"], sd[f"attn.{n}_proj.bias"] = w[j * d:(j + 1) * d], b[j * d:(j + 1) * d]
        for ours_name, ref_name in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attn.proj"),
                                    ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
            mod = blk.get_submodule(ours_name)
            sd[f"{ref_name}.weight"], sd[f"{ref_name}.bias"] = mod.weight.data, mod.bias.data
        a = ours.adapters[i]
        for ours_name, ref_name in (("down", "down_proj"), ("up", "up_proj")):
            sd[f"adaptmlp.{ref_name}.weight"] = getattr(a, ours_name).weight.data
            sd[f"adaptmlp.{ref_name}.bias"] = getattr(a, ours_name).bias.data
        ref.load_state_dict(sd, strict=True)
        with torch.no_grad(), ours.active():
            rows.append((f"adapter block {i}: output", float((blk(x) - ref(x)).abs().max())))
    return rows


def vpt_rows(ranpac: str) -> List[Tuple[str, float]]:
    from petl.vpt import VPT_ViT  # type: ignore

    from methods.peft import VPTPEFT
    from methods.vit import PromptedViT

    vit, kw = _small_vit(3)
    pv = PromptedViT(vit)
    x = torch.randn(2, 3, 32, 32)
    rows = []
    for deep in (True, False):
        ours = VPTPEFT(pv, num_tokens=5, deep=deep)
        ours.tokens.data.normal_()
        ref = VPT_ViT(Prompt_Token_num=5, VPT_type="Deep" if deep else "Shallow", **kw).eval()
        ref.load_state_dict(vit.state_dict(), strict=False)
        ref.Prompt_Tokens.data.copy_(ours.tokens.data)
        with torch.no_grad():
            rows.append((f"VPT-{'deep' if deep else 'shallow'}: [CLS] feature", float((ours.features(x) - ref(x)).abs().max())))
        ours.detach_hooks()
    return rows


def ssf_rows(ranpac: str) -> List[Tuple[str, float]]:
    import petl.vision_transformer_ssf as S  # type: ignore

    from methods.peft import SSFPEFT
    from methods.vit import PromptedViT

    vit, kw = _small_vit()
    pv = PromptedViT(vit)
    ours = SSFPEFT(pv)
    ref = S.VisionTransformer(tuning_mode="ssf", **kw).eval()
    ref.load_state_dict(vit.state_dict(), strict=False)
    names = {"patch": "patch_embed.ssf_%s_1", "norm": "ssf_%s_1"}
    for i in range(len(vit.blocks)):
        names.update({f"b{i}_norm1": f"blocks.{i}.ssf_%s_1", f"b{i}_norm2": f"blocks.{i}.ssf_%s_2",
                      f"b{i}_qkv": f"blocks.{i}.attn.ssf_%s_1", f"b{i}_proj": f"blocks.{i}.attn.ssf_%s_2",
                      f"b{i}_fc1": f"blocks.{i}.mlp.ssf_%s_1", f"b{i}_fc2": f"blocks.{i}.mlp.ssf_%s_2"})
    sd = ref.state_dict()
    for k, pat in names.items():
        sd[pat % "scale"], sd[pat % "shift"] = ours.ssf[k].scale.data.clone(), ours.ssf[k].shift.data.clone()
    ref.load_state_dict(sd)
    n_ref = sum(v.numel() for k, v in ref.named_parameters() if "ssf" in k)
    n_ours = sum(p.numel() for p in ours.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = float((ours.features(x) - ref.forward_features(x)[:, 0]).abs().max())
    return [("SSF: parameter count difference", float(abs(n_ref - n_ours))), ("SSF: [CLS] feature", diff)]


def ridge_rows(ranpac: str) -> List[Tuple[str, float]]:
    import RanPAC as R  # type: ignore

    from methods.ranpac import choose_ridge, ridge_readout

    rows = []
    for n, m, c in ((50, 20, 5), (203, 64, 10), (500, 128, 10)):
        h = torch.relu(torch.randn(n, m))
        y = F.one_hot(torch.randint(0, c, (n,)), c).float()
        theirs = R.Learner.optimise_ridge_parameter(None, h, y)
        ours = choose_ridge(h, y, list(range(-8, 9)))
        g, q = h.T @ h, h.T @ y
        wt = torch.linalg.solve(g + float(theirs) * torch.eye(m), q).T
        rows.append((f"ridge n={n} M={m}: chosen λ, abs(log10(ours / theirs))", abs(float(torch.log10(torch.tensor(ours / float(theirs)))))))
        rows.append((f"ridge n={n} M={m}: readout", float((ridge_readout(g, q, ours) - wt).abs().max())))
    return rows


def ease_rows(ease: str) -> List[Tuple[str, float]]:
    spec = importlib.util.spec_from_file_location("ref_ease_models", os.path.join(ease, "models", "ease.py"))
    E = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(E)  # type: ignore[union-attr]
    from backbone.linears import CosineLinear  # type: ignore

    from methods.ease import complement_prototypes, reweight_logits

    d, inc, rows = 8, 3, []
    for t in range(1, 4):
        c = inc * (t + 1)
        p = torch.randn(c, (t + 1) * d)
        net = types.SimpleNamespace(out_dim=d, fc=types.SimpleNamespace(weight=types.SimpleNamespace(data=p.clone())))
        fake = types.SimpleNamespace(_cur_task=t, moni_adam=False, use_init_ptm=False, init_cls=inc, inc=inc,
                                     _total_classes=c, _device="cpu", _network=net)
        fake.get_cls_range = lambda task_id, f=fake: E.Learner.get_cls_range(f, task_id)
        E.Learner.solve_sim_reset(fake)
        ours = complement_prototypes(p.clone(), [k * inc for k in range(t + 2)], t, d)
        rows.append((f"EASE t={t}: complemented prototypes", float((ours - net.fc.weight.data).abs().max())))
        fc = CosineLinear((t + 1) * d, c)
        fc.weight.data.copy_(ours)
        fc.sigma.data.fill_(1.0)
        x = torch.randn(5, (t + 1) * d)
        with torch.no_grad():
            theirs = fc.forward_reweight(x, cur_task=t, alpha=0.1, beta=0.0, init_cls=inc, inc=inc, out_dim=d)["logits"]
        mine = reweight_logits(x.reshape(5, t + 1, d), ours.reshape(c, t + 1, d), torch.arange(c) // inc, t, 0.1, 0.0)
        rows.append((f"EASE t={t}: reweighted logits", float((mine - theirs).abs().max())))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranpac", required=True, help="checkout of RanPAC/RanPAC")
    ap.add_argument("--ease", required=True, help="checkout of sun-hailong/CVPR24-Ease")
    a = ap.parse_args(argv)
    for flag, path, marker in (("--ranpac", a.ranpac, "RanPAC.py"), ("--ease", a.ease, "models/ease.py")):
        if not os.path.exists(os.path.join(path, marker)):
            print(f"error: {flag} {path} has no {marker}; pass a checkout of that repository", file=sys.stderr)
            return 2
    _shims()
    torch.manual_seed(0)
    rows: List[Tuple[str, float]] = []
    groups: List[Tuple[str, Callable[[str], List[Tuple[str, float]]]]] = [
        (a.ranpac, adapter_rows), (a.ranpac, vpt_rows), (a.ranpac, ssf_rows), (a.ranpac, ridge_rows), (a.ease, ease_rows)]
    for path, fn in groups:
        sys.path.insert(0, path)
        try:
            rows += fn(path)
        finally:
            sys.path.remove(path)
            for mod in [m for m in sys.modules if m.split(".")[0] in ("petl", "backbone", "utils", "RanPAC", "inc_net", "models")]:
                sys.modules.pop(mod, None)
    bad = 0
    print(f"| check | max abs difference | status (tol {TOL:g}) |\n|---|---|---|")
    for name, diff in rows:
        ok = diff <= TOL
        bad += not ok
        print(f"| {name} | {diff:.1e} | {'PASS' if ok else 'FAIL'} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main())

"""Cost report (benchmarks/cost/engine.py, flops.py, cost_report.py, throughput.py).

Expected values are derived in the tests: the closed form of a ViT pass, the extra attention
columns of a prefix, torch's FlopCounterMode running the real forward and backward, the SMoPE
poster's printed GFLOPs, and the reference implementations' parameter counts (baselines.md §5,
smope.md §1.2). Every registered method is checked; methods this file does not know get the
generic checks.
"""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bench
from benchmarks.config import BackboneConfig, resolve_config
from benchmarks.cost.engine import flop_summary, parameter_counts, probe_input, query_pass, run_cost, state_count
from benchmarks.tables.cost_table import make_tasks, random_backbone
from benchmarks.cost.flops import count_ops, flop_counter_sdpa_mapping
from methods.backbones import create_backbone
from methods.base import ContinualMethod, MethodOutput
from methods.registry import create_method, list_methods
from methods.vit import Prefix, PromptedViT

# ViT-B/16 at 224 px: N = 196 patches + [CLS], D = 768, MLP 4·D, 12 blocks, patch 16·16·3 = 768 inputs.
N, D, DEPTH = 197, 768, 12
VIT_B_CLOSED_FORM = DEPTH * (12 * N * D * D + 2 * N * N * D) + 196 * D * (3 * 16 * 16)
# micro ViT (vit_micro_patch8_32): 32 px / 8 → 16 patches + [CLS], width 64, 4 heads of 16, 6 blocks
MN, MD, MDEPTH = 17, 64, 6

# Forward passes at inference (query / TII pass + prompted pass) and in a training step.
KNOWN_PASSES = {
    "smope": (1, 1), "l2p": (2, 2), "dualprompt": (2, 2), "coda_prompt": (2, 2), "hide_prompt": (2, 1),
    "linear_probe": (1, 1), "ncm": (1, 0), "finetune": (1, 1), "joint": (1, 1),
    # issue 22, counted in the last of 5 tasks: APER = frozen (query) + adapted pass and RanPAC one
    # adapted pass, neither trains after task 1; EASE one pass per adapter (5), training one
    "aper": (2, 0), "ranpac": (1, 0), "slca": (1, 1), "ease": (5, 1),
}
# Added parameters of the reference configurations, ViT-B/16, Split CIFAR-100 (100 classes):
# baselines.md §5 (L2P, DualPrompt, CODA-P, HiDe-Prompt), smope.md §1.2 (SMoPE), head D·C + C.
HEAD = D * 100 + 100
REFERENCE_ADDED = {
    "l2p": 10 * 5 * D + 10 * D + HEAD,  # 122,980
    "dualprompt": 2 * 2 * 5 * D + 3 * 2 * 10 * 5 * D + 10 * D + HEAD,  # 330,340
    "coda_prompt": 5 * 100 * (8 * D + 2 * D) + HEAD,  # 3,916,900
    "hide_prompt": 5 * 2 * 10 * 5 * D + HEAD + 2_363_136 + HEAD,  # 2,900,936
    "smope": 6 * 25 * 12 * 2 * 64 + HEAD,  # 307,300
    "linear_probe": HEAD, "finetune": HEAD, "joint": HEAD, "ncm": 0,
}
# The SMoPE poster (smope.md §6.2): GFLOPs (train, test); its L2P row is Deep L2P++ (coda preset).
POSTER = {"l2p": (67.44, 67.44), "dualprompt": (33.72, 67.44), "coda_prompt": (67.44, 67.44),
          "hide_prompt": (33.72, 67.45), "smope": (33.72, 33.72), "vq_prompt": (67.44, 67.44)}


# counting and the tiny runs need no intra-op threads (they only contend on a busy CPU)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit_b():
    return random_backbone("vit_base_patch16_224")


def micro():
    backbone, _ = create_backbone(BackboneConfig(name="vit_micro_patch8_32", pretrained="none"))
    return backbone


def build(name, backbone, preset="quick", benchmark="synthetic", classes=30, tasks=5, upto=None):
    cfg = resolve_config(name, benchmark, preset)
    torch.manual_seed(0)
    m = create_method(name, backbone, classes, cfg.method, num_tasks=tasks)
    ts = make_tasks(classes, tasks)
    for t in ts[: (upto if upto is not None else tasks)]:
        m.begin_task(t)
    return m


# --- counting a plain ViT ---------------------------------------------------------------------

def test_plain_vit_b16_count_equals_closed_form_and_poster_convention(vit_b):
    backbone = PromptedViT(vit_b)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        c = count_ops(backbone.query, x, owner=backbone, shape_only=True)
    assert c.forward_total == pytest.approx(VIT_B_CLOSED_FORM, rel=1e-3)
    assert c.forward_total == VIT_B_CLOSED_FORM  # in fact exactly: only matrix products are counted
    assert c.forward["attention"] == DEPTH * 2 * N * N * D
    # the SMoPE poster: 33.72 GFLOPs for one pass, 67.44 for two (2 x the module-hook count)
    assert round(2 * c.paper / 1e9, 2) == 33.72
    assert round(4 * c.paper / 1e9, 2) == 67.44
    # ... which the exact count does not give: it is 2 x 17.56 = 35.13 GFLOPs per pass
    assert round(2 * c.forward_total / 1e9, 2) == 35.13

    head = nn.Linear(D, 1000)
    with torch.no_grad():
        c2 = count_ops(lambda z: head(backbone.query(z)), x, owner=nn.ModuleList([backbone, head]), shape_only=True)
    assert c2.forward_total == VIT_B_CLOSED_FORM + D * 1000


def test_fvcore_count_matches_flop_counter_mode_forward_and_backward_on_the_micro_vit():
    backbone = micro()
    x = torch.rand(2, 3, 32, 32)
    pk = nn.Parameter(torch.randn(1, 4, 5, 16))

    class Prompted(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.pk = backbone, pk

        def forward(self, z):
            return self.backbone(z, prefix={1: Prefix(self.pk, self.pk)})

    model = Prompted()
    with torch.no_grad():
        ours = count_ops(model, x)
        with FlopCounterMode(display=False, custom_mapping=flop_counter_sdpa_mapping()) as fc:
            model(x)
    assert ours.forward_total == fc.get_total_flops() / 2
    closed = 2 * (MDEPTH * (12 * MN * MD * MD + 2 * MN * MN * MD) + 16 * MD * 3 * 8 * 8) + 2 * 2 * MN * 5 * MD
    assert ours.forward_total == closed

    # Explicit (non-fused) attention: FlopCounterMode counts exactly the products autograd runs.
    for blk in backbone.vit.blocks:
        blk.attn.fused_attn = False
    tokens = nn.Parameter(torch.randn(1, 5, MD))

    class PromptTuned(nn.Module):  # prompt tokens at the input, frozen backbone (L2P style)
        def __init__(self):
            super().__init__()
            self.backbone, self.tokens = backbone, tokens

        def forward(self, z):
            return self.backbone(z, prompt_tokens=self.tokens.expand(z.shape[0], -1, -1))

    for trainable in (False, True):  # prompt method vs full fine-tuning
        backbone.set_trainable(trainable)
        m = PromptTuned()
        traced = count_ops(m, x)
        with FlopCounterMode(display=False) as fwd:
            m(x)
        with FlopCounterMode(display=False) as both:
            m(x).sum().backward()
        assert traced.forward_total == fwd.get_total_flops() / 2
        assert traced.backward_total == (both.get_total_flops() - fwd.get_total_flops()) / 2
        assert traced.backward_total > 0


def test_attention_backward_rule_counts_only_the_gradients_needed():
    # q without gradient (a layer whose queries come from the frozen image tokens), k and v with
    b, h, n, s, d = 1, 4, 17, 22, 16
    q = torch.randn(b, h, n, d)
    k = torch.randn(b, h, s, d, requires_grad=True)
    v = torch.randn(b, h, s, d, requires_grad=True)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.k, self.v = nn.Parameter(k.detach().clone()), nn.Parameter(v.detach().clone())

        def forward(self, z):
            return F.scaled_dot_product_attention(z, self.k, self.v)

    traced = count_ops(Attn(), q)
    with FlopCounterMode(display=False) as fc:  # the same attention written out
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
        (a @ v).sum().backward()
    product = b * h * n * s * d
    assert traced.forward["attention"] == 2 * product
    assert traced.backward["attention"] == 3 * product  # dV, dA, dK; no dQ
    assert traced.forward_total + traced.backward_total == fc.get_total_flops() / 2


def test_a_prefix_of_length_p_adds_2NPD_macs_per_prefixed_layer():
    backbone = micro()
    x = torch.rand(1, 3, 32, 32)
    p = 7
    prefix = {layer: Prefix(torch.randn(1, 4, p, 16), torch.randn(1, 4, p, 16)) for layer in (0, 2, 5)}
    with torch.no_grad():
        plain = count_ops(backbone, x)
        prompted = count_ops(lambda z: backbone(z, prefix=prefix), x, owner=backbone)
    assert prompted.forward_total - plain.forward_total == 3 * 2 * MN * p * MD
    assert prompted.forward["linear"] == plain.forward["linear"]  # prefixes add attention columns only
    # the papers' module-hook convention does not see attention, so it does not see prefixes either
    assert prompted.paper == plain.paper


# --- every registered method ------------------------------------------------------------------

@pytest.mark.parametrize("name", list_methods())
def test_passes_and_query_pass_of_every_method(name):
    backbone = micro()
    m = build(name, backbone)
    x = probe_input(backbone)
    q = query_pass(backbone, x)
    plain = q.count.forward_total
    s = flop_summary(m, x, q)
    # the shape-only kernels (used for speed) leave every figure unchanged
    assert s == flop_summary(m, x, query_pass(backbone, x, shape_only=False), shape_only=False)
    # each pass costs at least one plain pass
    assert s["inference_gmacs"] * 1e9 >= s["inference_passes"] * plain * 0.999
    assert s["query_pass"] == bool(m.uses_query)
    if name in KNOWN_PASSES:
        assert (s["inference_passes"], s["train_passes"]) == KNOWN_PASSES[name]
    else:  # a method this file does not know: one pass, plus the query pass when it declares one
        assert s["inference_passes"] == 1 + int(m.uses_query and not m.is_baseline)
    if s["inference_passes"] == 2 and name in KNOWN_PASSES and name != "l2p":
        # query pass + prefix-prompted pass: 2 plain passes plus the prefix columns and the heads
        assert 2 * plain <= s["inference_gmacs"] * 1e9 < 2.2 * plain
    if name == "linear_probe":
        assert s["inference_gmacs"] * 1e9 == pytest.approx(plain + MD * 30, abs=1e-3)
        assert s["train_bwd_gmacs"] * 1e9 == pytest.approx(MD * 30, abs=1e-3)  # the head's weight gradient only
    if name == "smope":
        assert s["inference_gmacs"] * 1e9 < 1.2 * plain


@pytest.mark.parametrize("name", list_methods())
def test_vit_b16_table_parameters_and_paper_convention(name, vit_b):
    """Parameter counts of the cost table (parameter_counts) for the reference configurations, and
    the paper-convention GFLOPs against the SMoPE poster (its L2P row is Deep L2P++: coda preset)."""
    backbone = PromptedViT(vit_b)
    preset = "coda" if name == "l2p" else "paper"
    m = build(name, backbone, preset="paper", benchmark="cifar100", classes=100, tasks=10, upto=1)
    counts = parameter_counts(m)
    assert counts["backbone_params"] == 85_798_656  # ViT-B/16 without head, counted once
    if name in REFERENCE_ADDED:
        assert counts["added_params"] == REFERENCE_ADDED[name]
    else:
        assert counts["added_params"] == sum(p.numel() for p in m.method_parameters())
    if name in POSTER:
        mp = m if preset == "paper" else build(name, backbone, preset=preset, benchmark="cifar100", classes=100, tasks=10, upto=1)
        x = probe_input(backbone)
        s = flop_summary(mp, x, query_pass(backbone, x), name)
        train, test = POSTER[name]
        assert round(s["paper_convention_gflops_train"], 2) == train
        # HiDe-Prompt: the poster prints 67.45; two passes + the TII MLP count 67.44 here
        assert round(s["paper_convention_gflops_inference"], 2) == (67.44 if name == "hide_prompt" else test)


# --- parameters and state -----------------------------------------------------------------------

class _Toy(ContinualMethod):
    """A method with a detach-frozen parameter, integer and boolean counters and class statistics."""

    def __init__(self, backbone, num_classes, cfg=None):
        super().__init__(backbone, num_classes, cfg)
        from methods.alignment import ClassStats

        self.head = nn.Linear(backbone.embed_dim, num_classes)
        self.pool = nn.Parameter(torch.zeros(10, backbone.embed_dim))
        self.register_buffer("usage", torch.zeros(3, 5, dtype=torch.long))
        self.register_buffer("flags", torch.zeros(3, 5, dtype=torch.bool))
        self.stats = ClassStats("multi-centroid", n_centroids=4)

    def trainable_parameters(self):
        return self.head.weight.numel() + self.head.bias.numel() + 2 * self.backbone.embed_dim

    def state_numbers(self):
        return {"usage": self.usage.numel(), "flags": self.flags.numel(), "class_statistics": self.stats.numbers()}

    def forward(self, x, query=None, **kw):
        return MethodOutput(logits=self.head(self.get_query(x, query)))


def test_parameters_state_bytes_and_projected_class_statistics():
    backbone = micro()
    m = _Toy(backbone, 6)
    tasks = make_tasks(6, 3)
    for t in tasks:
        m.begin_task(t)
    c = parameter_counts(m)
    assert c["added_params"] == c["allocated_params"] == c["used_params"] == MD * 6 + 6 + 10 * MD
    assert c["trainable_params"] == MD * 6 + 6 + 2 * MD  # the method's own accounting
    assert c["state_numbers"] == 30 and c["state_bytes"] == 15 * 8 + 15 * 1  # int64 and bool
    projected = state_count(m, project_task=tasks[-1])
    stats = 6 * 4 * 2 * MD  # 6 seen classes x 4 centroids x (mean + variance) x D, float64
    assert projected.projected and projected.by_kind["class_statistics"] == stats
    assert projected.numbers == 30 + stats and projected.bytes == 135 + 8 * stats
    m.stats.add(0, torch.randn(1, MD))  # measured once filled (one sample: one centroid): no projection
    filled = state_count(m, project_task=tasks[-1])
    assert not filled.projected and filled.by_kind["class_statistics"] == 2 * MD
    assert filled.bytes == 135 + 8 * 2 * MD


def test_run_cost_reports_the_table_figures_and_leaves_the_method_untouched():
    backbone = micro()
    m = build("linear_probe", backbone)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    cost = run_cost(m, None)
    for key in ("backbone_params", "added_params", "trainable_params", "used_params", "state_numbers", "state_bytes",
                "query_pass", "inference_passes", "inference_gmacs", "inference_gflops", "train_gmacs", "train_fwd_gmacs"):
        assert key in cost
    assert cost["inference_gflops"] == pytest.approx(2 * cost["inference_gmacs"])
    assert cost["inference_gmacs"] * 1e9 == pytest.approx(VIT_MICRO_PLAIN + MD * 30, abs=1e-3)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


VIT_MICRO_PLAIN = MDEPTH * (12 * MN * MD * MD + 2 * MN * MN * MD) + 16 * MD * 3 * 8 * 8


# --- the command ----------------------------------------------------------------------------------

def test_cost_cli_writes_every_file_with_the_table_figures(tmp_path, capsys):
    out = tmp_path / "cost"
    code = bench.main(["cost", "-b", "synthetic", "-m", "linear_probe,smope", "--preset", "quick",
                       "--backbone", "vit_micro_patch8_32", "--tasks", "2", "5", "--throughput", "--batch-size", "4", "--threads", "1",
                       "--out", str(out), "--set", "benchmark.num_classes=10"])
    captured = capsys.readouterr()
    assert code == 0
    for f in ("cost.csv", "cost.md", "cost.tex", "growth.csv", "params_vs_tasks.png", "params_vs_tasks.pdf"):
        assert (out / f).stat().st_size > 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "cost.csv"))}
    assert set(rows) == {"linear_probe", "smope"}
    backbone = micro()
    for name, r in rows.items():
        m = build(name, backbone, classes=10, tasks=5)
        counts = parameter_counts(m)
        for key in ("backbone_params", "added_params", "trainable_params", "used_params"):
            assert int(r[key]) == counts[key], (name, key)
        assert float(r["infer_img_s"]) > 0 and r["hardware"] and r["batch_size"] == "4"
        assert float(r["est_run_hours"]) > 0  # throughput measured on the preset's own backbone
        assert float(r["inference_gflops"]) == pytest.approx(2 * float(r["inference_gmacs"]))
    assert rows["linear_probe"]["query_pass"] == "True" and rows["smope"]["inference_passes"] == "1"
    growth = list(csv.DictReader(open(out / "growth.csv")))
    assert {(g["method"], g["num_tasks"]) for g in growth} == {(m, t) for m in rows for t in ("2", "5")}
    assert "| method |" in captured.out and "GMACs" in captured.out and "GFLOPs" in captured.out
    assert "1 torch threads" in rows["smope"]["hardware"] and "for a full quick run" in captured.out


def test_methods_without_a_preset_entry_fall_back_to_their_quick_method_config():
    from benchmarks.config import resolve_config as resolve
    from benchmarks.tables.cost_table import resolve_method_config

    # SMoPE's preset file has paper entries for cifar100 / imagenet_r / cub200 only
    cfg, label = resolve_method_config("smope", "synthetic", "paper", {})
    assert label == "quick method config (no paper preset)"
    assert cfg.method == resolve("smope", "synthetic", "quick").method
    assert cfg.backbone.name == resolve("smope", "synthetic", "paper", strict=False).backbone.name  # the paper preset's backbone
    cfg, label = resolve_method_config("smope", "cifar100", "paper", {})
    assert label == "paper" and cfg.method == resolve("smope", "cifar100", "paper").method
    cfg, label = resolve_method_config("finetune", "cifar100", "coda", {})
    assert label == "method defaults (no coda preset)"


def test_cost_cli_unknown_method_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cost"
    code = bench.main(["cost", "-b", "synthetic", "-m", "linear_probe,nosuchmethod", "--out", str(out)])
    assert code == 2
    assert "nosuchmethod" in capsys.readouterr().err
    assert not out.exists()

"""`bench.py gpu-check` in its CPU mode: runs without fvcore / iopath / submitit, and its JSON is
internally consistent (img/s from the measured step times, FLOPs against the ViT's closed form,
utilisation from FLOPs, img/s and the peak), so the GPU path cannot break unseen."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Packages a bare GPU machine lacks (issue 18: only PyTorch, timm, torchvision, pandas, matplotlib,
# seaborn, tabulate, tensorboard): importing any of them must fail in the child process.
BLOCKED = ("fvcore", "iopath", "submitit", "sklearn", "scipy")


def micro_vit_macs(classes: int) -> dict:
    """MACs per image of the micro ViT (vit_micro_patch8_32: 32 px, patch 8, width 64, depth 6,
    MLP 256, class token) plus a linear head, by hand: patch conv, and per layer qkv, QKᵀ, A·V,
    proj and the two MLP products."""
    p, n, d, depth, hidden = 16, 17, 64, 6, 256
    conv = p * d * 3 * 8 * 8
    linear = depth * (n * d * 3 * d + n * d * d + 2 * n * d * hidden)
    attention = depth * 2 * n * n * d
    return {"conv": conv, "linear": linear, "attention": attention, "head": d * classes}


def run_poisoned(args: list, tmp: Path) -> subprocess.CompletedProcess:
    code = ("import sys, runpy\n"
            f"for m in {BLOCKED!r}: sys.modules[m] = None  # `import m` now raises ImportError\n"
            f"sys.argv = ['bench.py'] + {args!r}\n"
            "runpy.run_path('bench.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    refs = tmp / "refs"
    refs.mkdir()
    out = tmp / "out"
    p = run_poisoned(["gpu-check", "--device", "cpu", "--methods", "finetune,hide_prompt,ncm", "--batch-size", "2",
                      "--max-steps", "2", "--budget", "60", "--threads", "1", "--no-compile", "--ref-root", str(refs),
                      "--out", str(out)], tmp)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_cpu_mode_runs_without_fvcore_iopath_submitit(cpu_check):
    r, md = cpu_check
    assert r["complete"] and not r["errors"]
    assert not [x for x in r["runs"] if "error" in x]
    # every method, phase and precision measured: finetune (1 phase), hide_prompt (tii + prompt), ncm (no training)
    got = {(x["method"], x["mode"], x["phase"], x["precision"]) for x in r["runs"]}
    want = {(m, "train", ph, p) for m, ph in (("finetune", "train"), ("hide_prompt", "tii"), ("hide_prompt", "prompt"))
            for p in ("fp32", "bf16")}
    want |= {(m, "infer", None, p) for m in ("finetune", "hide_prompt", "ncm") for p in ("fp32", "bf16")}
    assert got == want
    assert r["settings"]["train_batch"] == {"finetune": 2, "hide_prompt": 2, "ncm": 2}
    assert "| finetune | train (train) | 2 |" in md and "| hide_prompt | train (tii) | 2 |" in md


def test_rates_and_utilisation_follow_from_the_measurements(cpu_check):
    r, _ = cpu_check
    peak = r["device"]["peak"]["used_tflops"]
    assert r["device"]["peak"]["table_bf16_tflops"] is None  # a CPU: the measured matmul is the peak
    assert peak == r["device"]["peak"]["matmul_bf16_tflops"] > 0
    for x in r["runs"]:
        assert len(x["step_s"]) == x["steps"] and 1 <= x["steps"] <= 2
        assert x["median_s"] == pytest.approx(statistics.median(x["step_s"]), rel=1e-12)
        assert x["img_s"] == pytest.approx(x["batch"] / statistics.median(x["step_s"]), rel=1e-12)
        assert x["flops_per_image"] == pytest.approx(x["flops_per_step"] / x["batch"], rel=1e-12)
        assert x["tflops"] == pytest.approx(x["flops_per_image"] * x["img_s"] / 1e12, rel=1e-12)
        assert x["utilisation"] == pytest.approx(x["tflops"] / peak, rel=1e-12)
        assert x["peak_mem_mib"] > 0


def test_flops_match_the_closed_form(cpu_check):
    """finetune = micro ViT + a 200-class head (ImageNet-R). Inference: every product once. A
    training step: the forward, every weight gradient (dW, same size as the product), every input
    gradient except the image's (the patch convolution's dX is not needed), and attention's four
    backward products (dV, dA, dQ, dK = 2x its two forward products)."""
    r, _ = cpu_check
    m = micro_vit_macs(200)
    lin = m["linear"] + m["head"]
    fwd = m["conv"] + lin + m["attention"]
    train = 3 * (m["conv"] + lin) - m["conv"] + 3 * m["attention"]
    for x in r["runs"]:
        if x["method"] == "finetune":
            want = fwd if x["mode"] == "infer" else train
            assert x["flops_per_image"] == pytest.approx(2 * want, rel=1e-9), (x["mode"], x["precision"])


def test_precision_and_loader_and_missing_references(cpu_check):
    r, _ = cpu_check
    prec = {p["method"]: p for p in r["precision"]}
    assert set(prec) == {"finetune", "hide_prompt", "ncm"}
    for p in prec.values():
        assert 0 <= p["mean_abs"] <= p["max_abs"] and 0 <= p["agreement"] <= 1 and p["images"] == 2
    ld = r["loader"]
    assert ld["workers"] == min(8, os.cpu_count()) and ld["train_transform"] == "rrc_flip"  # the preset's 8, capped by cores
    assert ld["img_s"] == pytest.approx(ld["timed_images"] / ld["timed_s"], rel=1e-12) and ld["timed_images"] > 0
    refs = {x["reference"]: x for x in r["references"]}
    assert set(refs) == {"hide"}  # only the references of the methods checked
    assert "no checkout of thu-ml/HiDe-Prompt" in refs["hide"]["error"]


def test_reference_checkouts_are_found_under_any_of_their_names(tmp_path):
    from benchmarks.tools.gpu_check import find_reference

    for d in ("l2p", "coda_prompt", "Minhchuyentoancbn+SMoPE", "dualprompt-pytorch"):
        (tmp_path / d).mkdir()
    assert find_reference(tmp_path, "l2p", "l2p", "JH-LEE-KR/l2p-pytorch") == tmp_path / "l2p"
    assert find_reference(tmp_path, "coda", "coda_prompt", "GT-RIPL/CODA-Prompt") == tmp_path / "coda_prompt"
    assert find_reference(tmp_path, "smope", "smope", "Minhchuyentoancbn/SMoPE") == tmp_path / "Minhchuyentoancbn+SMoPE"
    assert find_reference(tmp_path, "dualprompt", "dualprompt", "JH-LEE-KR/dualprompt-pytorch") == tmp_path / "dualprompt-pytorch"
    assert find_reference(tmp_path, "hide", "hide_prompt", "thu-ml/HiDe-Prompt") is None


def test_logit_difference_by_hand():
    from benchmarks.tools.gpu_check import logit_difference

    a = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    b = torch.tensor([[1.5, 1.0], [3.0, 0.5]])
    d = logit_difference(a, b)
    assert d["max_abs"] == 1.0 and d["mean_abs"] == 0.5 and d["agreement"] == 0.5  # argmax (1, 0) vs (0, 0)
    assert d["fp32_logit_std"] == pytest.approx(float(torch.tensor([1.0, 2.0, 3.0, 0.0]).std()))


def test_peak_table_picks_the_right_variant():
    from benchmarks.tools.gpu_check import table_peak_tflops

    # dense bf16 tensor-core peaks of the data sheets
    assert table_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert table_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert table_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert table_peak_tflops("NVIDIA H200") == 989.4
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert table_peak_tflops("NVIDIA L40S") == 362.1
    assert table_peak_tflops("NVIDIA L40") == 181.0
    assert table_peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert table_peak_tflops("Some Future Accelerator") is None


def test_compile_stage_alone_counts_flops_and_reports_compile_time_apart(tmp_path, one_thread):
    """The compile stage without the eager one, with dynamo's eager backend (it traces and generates
    no code: seconds on a CPU). linear_probe: a no-grad query pass through the frozen micro ViT and
    a 200-class head; training adds only the head's weight gradient."""
    import bench

    out = tmp_path / "o"
    assert bench.main(["gpu-check", "--device", "cpu", "--methods", "linear_probe", "--batch-size", "2", "--max-steps", "2",
                       "--budget", "60", "--precisions", "bf16", "--stages", "compile", "--compile-backend", "eager",
                       "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["settings"]["stages"] == ["compile"] and r["loader"] is None and not r["skipped"]
    comp = {x["mode"]: x for x in r["runs"]}
    assert set(comp) == {"train", "infer"} and all(x["compiled"] for x in comp.values())
    m = micro_vit_macs(200)
    vit = m["conv"] + m["linear"] + m["attention"]
    assert comp["infer"]["flops_per_image"] == pytest.approx(2 * (vit + m["head"]), rel=1e-9)
    assert comp["train"]["flops_per_image"] == pytest.approx(2 * (vit + 2 * m["head"]), rel=1e-9)
    for x in comp.values():
        assert x["compile_s"] == pytest.approx(max(0.0, x["first_call_s"] - x["median_s"]), rel=1e-12)
        assert x["utilisation"] == pytest.approx(x["flops_per_image"] * x["img_s"] / 1e12 / r["device"]["peak"]["used_tflops"])


def test_user_errors_exit_2(tmp_path, monkeypatch, capsys):
    import bench

    assert bench.main(["gpu-check", "--device", "cpu", "--precisions", "fp16", "--out", str(tmp_path / "a")]) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu-check", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --precisions takes fp32, bf16 or both, comma-separated.",
                   "error: gpu-check found no CUDA device; pass --device cpu for the tiny CPU mode."]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_missing_package_is_named_in_one_sentence(tmp_path, monkeypatch, capsys):
    """`bench.py cost` counts FLOPs with fvcore: without it, one sentence and status 2, no outputs."""
    import bench

    for name in [m for m in sys.modules if m == "fvcore" or m.startswith("fvcore.")] + ["fvcore"]:
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "cost"
    assert bench.main(["cost", "-b", "synthetic", "-m", "linear_probe", "--preset", "quick", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: this command needs the Python package 'fvcore', which is not installed (pip install fvcore)."]
    assert not out.exists()

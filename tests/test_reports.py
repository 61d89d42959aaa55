"""Reports: tables checked against the result files, reproduction deltas, protocol diff, paired CI, plots, HTML.

The runs folder holds ONE real tiny run (linear_probe, seed 0, built the way conftest's ``tiny_run``
builds it: the report must read what the runner really writes) and hand-written results derived
from it with hand-chosen accuracy matrices (linear_probe seed 1, ncm, ``fake_prompt`` and an upper
bound ``joint``; 2 seeds each), so that most expected numbers are exact and the fixture trains
only once (the file runs in well under 30 s). Every expected value below is computed in this file
from the stored matrices, independently of reports/ (FAA, CAA, FFM from their definitions; sample
std; t quantile in closed form for 1 and 2 dof).
"""
from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import bench
from conftest import make_tiny_config

FAKE = {  # hand-chosen 3-task matrices of a method that is not registered: exact expected numbers
    0: [[90.0, None, None], [80.0, 85.0, None], [70.0, 75.0, 88.0]],
    1: [[92.0, None, None], [84.0, 86.0, None], [74.0, 77.0, 90.0]],
}
JOINT = {  # an upper bound with the highest FAA: shown, never marked best
    0: [[99.0, None, None], [99.0, 99.0, None], [99.0, 98.0, 99.0]],
    1: [[98.0, None, None], [99.0, 98.0, None], [99.0, 99.0, 98.0]],
}
FAKE_HIST = {"0": [3, 1, 0, 0], "1": [0, 2, 2, 0], "2": [0, 0, 1, 5]}

REFS = """
paper: "hand-written test references"
defaults: {benchmark: synthetic, num_tasks: 3, tag: V, source: "test entry", backbone: vit_base_patch16_224}
entries:
  - {method: "Fake (paper)", ours: fake_prompt, metric: faa, value: 50.0, std: 1.0}
  - {method: "Fake, other task count", ours: fake_prompt, metric: faa, value: 60.0, num_tasks: 5}
  - {method: "LP, other lr", ours: linear_probe, metric: caa, value: 40.0, match: {train.lr: 123.0}}
  - {method: "LP", ours: linear_probe, metric: ffm, value: 10.0, match: {benchmark.num_tasks: 3}}
  - {method: "NCM size", ours: ncm, metric: added_params_m, value: 0.5}
  - {method: "No counterpart", ours: null, metric: faa, value: 1.0}
  - {method: "Fake size, 5 tasks", ours: fake_prompt, metric: added_params_m, value: 0.001, num_tasks: 5, note: "no run: cost.csv"}
"""


# --- independent reference computations ------------------------------------------------------

def faa(A):
    return float(np.mean(A[-1]))


def caa(A):
    return float(np.mean([np.mean(A[t][: t + 1]) for t in range(len(A))]))


def ffm(A):
    T = len(A)
    return float(np.mean([max(A[t][j] for t in range(j, T)) - A[T - 1][j] for j in range(T - 1)]))


METRIC_FN = {"faa": faa, "caa": caa, "ffm": ffm}


def write_result(root: Path, res: dict) -> None:
    d = root / res["benchmark"] / res["method"] / f"seed{res['seed']}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(json.dumps(res))


def hand_result(template: dict, method: str, seed: int, A, **extra) -> dict:
    r = copy.deepcopy(template)
    r.update(method=method, method_name=method.split("@")[0], seed=seed, acc_matrix=A, is_baseline=False,
             is_upper_bound=False, metrics={})  # metrics left empty: the report recomputes them from the matrix
    r["config"]["method_name"] = method.split("@")[0]
    r.update(extra)
    return r


LP1 = [[60.0, None, None], [40.0, 55.0, None], [30.0, 35.0, 50.0]]  # linear_probe seed 1 (seed 0 is a real run)
NCM = {
    0: [[95.0, None, None], [93.0, 90.0, None], [92.0, 88.0, 91.0]],
    1: [[94.0, None, None], [92.0, 91.0, None], [90.0, 89.0, 93.0]],
}
SEED1_ORDER = [5, 3, 1, 0, 2, 4]  # seed 1's class order, shared by every method (as the runner does)
NCM_EPOCHS = 0  # a differing training budget the protocol-difference table must show


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Runs folder (1 real run + hand-written results), cost folder, references, and the report of it all."""
    from benchmarks.run.runner import prepare, run_prepared

    root = tmp_path_factory.mktemp("reports")
    runs = root / "runs"
    cfg = make_tiny_config("linear_probe")
    cfg.seed = 0
    run_prepared(prepare(cfg), runs, log_to_stdout=False)
    lp = json.loads((runs / "synthetic-3t" / "linear_probe" / "seed0" / "result.json").read_text())
    assert sorted(lp["scenario"]["class_order"]) == sorted(SEED1_ORDER)
    lp1 = hand_result(lp, "linear_probe", 1, LP1, is_baseline=True, cost=lp["cost"])
    lp1["scenario"]["class_order"] = SEED1_ORDER
    write_result(runs, lp1)
    for s in (0, 1):
        def seeded(r, s=s):
            if s == 1:
                r["scenario"]["class_order"] = SEED1_ORDER
            return r
        ncm = seeded(hand_result(lp, "ncm", s, NCM[s], is_baseline=True, cost={"added_params": 0}))
        ncm["config"]["train"]["epochs"] = NCM_EPOCHS
        write_result(runs, ncm)
        fake = seeded(hand_result(lp, "fake_prompt", s, FAKE[s], cost={"added_params": 777, "inference_gflops": 0.02}))
        fake["diagnostics"] = {"selection_hist": {"final": FAKE_HIST, "diagonal": {}}, "selection_size": 4,
                               "task_id_accuracy": {"final": {"0": 100.0, "1": 50.0 + 10 * s, "2": 0.0},
                                                    "diagonal": {}, "final_mean": (150.0 + 10 * s) / 3},
                               "method_traits": {"first_task_only": True, "trains_backbone": False,
                                                 "class_statistics": True}}
        write_result(runs, fake)
        write_result(runs, seeded(hand_result(lp, "joint", s, JOINT[s], is_baseline=True, is_upper_bound=True,
                                              cost={"added_params": 5000})))
    cost = root / "cost"
    cost.mkdir()
    pd.DataFrame([
        {"method": "linear_probe", "is_baseline": True, "backbone": "vit_micro_patch8_32", "added_params": 390,
         "inference_gflops": 0.011, "infer_img_s": 900.0},
        {"method": "ncm", "is_baseline": True, "backbone": "vit_micro_patch8_32.other_tag", "added_params": 0,
         "inference_gflops": 0.01, "infer_img_s": 1000.0},
        {"method": "fake_prompt", "is_baseline": False, "backbone": "vit_micro_patch8_32", "added_params": 1,
         "inference_gflops": 9.9, "infer_img_s": 500.0},
    ]).to_csv(cost / "cost.csv", index=False)
    pd.DataFrame([{"method": m, "num_tasks": n, "added_params": p * n, "used_params": p}
                  for m, p in (("fake_prompt", 100), ("ncm", 1)) for n in (5, 10, 20)]).to_csv(cost / "growth.csv", index=False)
    refs = root / "refs"
    refs.mkdir()
    (refs / "test.yaml").write_text(REFS)
    out = root / "report"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = bench.main(["report", "--runs", str(runs), "--out", str(out), "--cost", str(cost), "--references", str(refs),
                           "--compare", "fake_prompt", "linear_probe"])
    assert code == 0
    results = {}
    for p in sorted(runs.rglob("result.json")):
        r = json.loads(p.read_text())
        results.setdefault(r["method"], []).append(r)
    return {"root": root, "runs": runs, "out": out, "cost": cost, "stdout": buf.getvalue(), "results": results}


def md_rows(md: str) -> dict:
    """Markdown pipe table -> {method cell (row key): [cells]} (first table of the text)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[header.index("method")]] = dict(zip(header, cells))
    return rows


# --- main table -------------------------------------------------------------------------------

def test_main_table_mean_std_n_match_the_result_files(world):
    data = pd.read_csv(world["out"] / "tables" / "main.csv").set_index("method")
    md = md_rows((world["out"] / "tables" / "main.md").read_text())
    assert set(data.index) == {"linear_probe", "ncm", "fake_prompt", "joint"}
    for method, results in world["results"].items():
        assert data.at[method, "n_seeds"] == len(results) == 2
        for m, fn in METRIC_FN.items():
            vals = [fn(r["acc_matrix"]) for r in results]
            assert data.at[method, f"{m}_mean"] == pytest.approx(np.mean(vals), abs=1e-9)
            assert data.at[method, f"{m}_std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-9)  # sample std
            cell = next(v for k, v in md[_display(method)].items() if k.startswith(m.upper()))
            assert cell.strip("*") == f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"
    # exact hand values: fake FAA = mean(77.667, 80.333) = 79.0; FFM seed0 = (20+10)/2, seed1 = (18+9)/2
    assert data.at["fake_prompt", "faa_mean"] == pytest.approx(79.0)
    assert data.at["fake_prompt", "ffm_mean"] == pytest.approx((15.0 + 13.5) / 2)
    assert md[_display("ncm")]["n"] == "2"


def test_main_table_shows_the_precision_each_run_recorded(world):
    md = md_rows((world["out"] / "tables" / "main.md").read_text())
    for method, results in world["results"].items():
        recorded = {r["env"]["precision"] for r in results}
        assert recorded == {"fp32"}  # the default: no run of the fixture asked for bf16
        assert md[_display(method)]["precision"] == "fp32"


def _display(method):
    return {"ncm": "ncm (baseline)", "linear_probe": "linear_probe (baseline)", "joint": "joint (upper bound)"}.get(method, method)


def test_cost_columns_come_from_the_runs_or_else_cost_csv_on_the_same_architecture(world):
    data = pd.read_csv(world["out"] / "tables" / "main.csv").set_index("method")
    cost = pd.read_csv(world["cost"] / "cost.csv").set_index("method")
    for method, results in world["results"].items():
        own = results[0]["cost"]
        for key in ("added_params", "inference_gflops", "infer_img_s"):
            if own.get(key) is not None:
                expected = own[key]
            elif method in cost.index and key in cost.columns:
                expected = cost.at[method, key]  # both backbones are vit_micro_patch8_32 (tags may differ)
            else:
                expected = None
            got = data.at[method, key]
            assert (pd.isna(got) if expected is None else got == pytest.approx(expected)), (method, key)
    assert data.at["fake_prompt", "inference_gflops"] == pytest.approx(0.02)  # its own result wins over cost.csv's 9.9
    md = md_rows((world["out"] / "tables" / "main.md").read_text())
    assert md["joint (upper bound)"]["inference GFLOPs/img ↓"] == "—"  # neither source has it


def test_best_value_per_column_is_marked_in_the_metric_direction_and_never_for_the_upper_bound(world):
    data = pd.read_csv(world["out"] / "tables" / "main.csv").set_index("method")
    md = md_rows((world["out"] / "tables" / "main.md").read_text())
    tex = (world["out"] / "tables" / "main.tex").read_text()
    ranked = [m for m in data.index if m != "joint"]
    for m, higher in (("faa", True), ("caa", True), ("ffm", False)):
        means = {k: round(float(np.mean([METRIC_FN[m](r["acc_matrix"]) for r in world["results"][k]])), 2) for k in ranked}
        best = max(means.values()) if higher else min(means.values())
        winners = {k for k, v in means.items() if v == best}
        for k in data.index:
            cell = next(v for c, v in md[_display(k)].items() if c.startswith(m.upper()))
            assert cell.startswith("**") == (k in winners), (m, k, cell)
            assert bool(data.at[k, f"{m}_best"]) == (k in winners)
        for k in winners:
            std = np.std([METRIC_FN[m](r["acc_matrix"]) for r in world["results"][k]], ddof=1)
            assert rf"\textbf{{{means[k]:.2f} $\pm$ {std:.2f}}}" in tex
    assert data.at["joint", "faa_mean"] > max(data.loc[ranked, "faa_mean"])  # the oracle is best, but not marked
    assert not data.loc["joint", ["faa_best", "caa_best", "ffm_best"]].any()
    assert bool(data.at["ncm", "added_params_best"])  # 0 added parameters: lowest is best


# --- reproduction -----------------------------------------------------------------------------

def test_reproduction_lists_only_matching_settings_with_the_delta(world):
    rep = pd.read_csv(world["out"] / "tables" / "reproduction.csv")
    assert sorted(rep.paper_method) == ["Fake (paper)", "Fake size, 5 tasks", "LP", "NCM size"]
    # no run has 5 tasks: an efficiency number is still compared with cost.csv's row of the method
    size = rep[rep.paper_method == "Fake size, 5 tasks"].iloc[0]
    cost = pd.read_csv(world["cost"] / "cost.csv").set_index("method")
    assert size.ours_source == "cost.csv" and size.n_seeds == 0
    assert size.ours_mean == pytest.approx(cost.at["fake_prompt", "added_params"] / 1e6)
    assert size.delta == pytest.approx(cost.at["fake_prompt", "added_params"] / 1e6 - 0.001)
    fake = rep[rep.paper_method == "Fake (paper)"].iloc[0]
    assert fake.num_tasks == 3 and fake.metric == "faa" and fake.n_seeds == 2
    assert fake.ours_mean == pytest.approx(79.0)
    assert fake.delta == pytest.approx(79.0 - 50.0)
    assert fake.tag == "V" and fake.paper_backbone == "vit_base_patch16_224" and bool(fake.backbone_differs)
    lp = rep[rep.paper_method == "LP"].iloc[0]
    lp_ffm = np.mean([ffm(r["acc_matrix"]) for r in world["results"]["linear_probe"]])
    assert lp.delta == pytest.approx(lp_ffm - 10.0)
    ncm = rep[rep.paper_method == "NCM size"].iloc[0]
    assert ncm.delta == pytest.approx(world["results"]["ncm"][0]["cost"]["added_params"] / 1e6 - 0.5)
    md = (world["out"] / "tables" / "reproduction.md").read_text()
    assert "+29.00" in md and "50.00 ± 1.00" in md and "BACKBONE DIFFERS" in md


def test_shipped_reference_files_load_with_tags_and_settings():
    from reports.references import load_references

    refs = load_references()
    assert len(refs) > 100
    assert all(r.tag in ("V", "R") and r.source and r.num_tasks > 0 for r in refs)
    files = {r.file for r in refs}
    assert {"smope_poster.yaml", "coda_prompt.yaml", "hide_prompt.yaml", "l2p.yaml", "dualprompt.yaml"} <= files
    # spot checks against shared/reference (smope.md §6.1 and §6.2, baselines.md §7.1 and §7.3)
    smope = [r for r in refs if r.ours == "smope" and r.benchmark == "imagenet_r" and r.metric == "faa"]
    assert [(r.value, r.std, r.num_tasks) for r in smope] == [(79.32, 0.42, 10)]
    assert [r.value for r in refs if r.ours == "smope" and r.metric == "inference_gflops_paper"] == [33.72]
    coda5 = [r for r in refs if r.method == "CODA-P" and r.num_tasks == 5 and r.metric == "faa"]
    assert [(r.value, r.benchmark) for r in coda5] == [(76.51, "imagenet_r")]
    l2p = [r for r in refs if r.method == "L2P (paper)" and r.benchmark == "cifar100" and r.metric == "faa"]
    assert l2p[0].value == 83.83 and l2p[0].std_tag == "R" and l2p[0].match == {"method.variant": "l2p"}


# --- protocol differences ---------------------------------------------------------------------

def test_protocol_diff_lists_exactly_the_differing_settings(world, tmp_path):
    from reports.loader import load_runs
    from reports.tables import protocol_diff_table

    base = world["results"]["linear_probe"][0]
    variants = {
        "alpha": {},
        "alpha@v2": {"method.pool_size": 30},  # same method, other hyper-parameter: shown
        "beta": {"train.lr": base["config"]["train"]["lr"] * 2, "method.pool_size": 20},  # pool size of another method: not
        "gamma": {"env.backbone.sha256": "0" * 64, "benchmark.normalize": "imagenet", "method.batchwise_prompt": True},
    }
    for label, changes in variants.items():
        r = hand_result(base, label, 0, FAKE[0])
        r["config"]["method"] = {"pool_size": 10, "batchwise_prompt": False}
        r["env"]["hostname"] = f"host-{label}"  # ignored: cannot change the outcome
        r["config"]["train"]["num_workers"] = len(label)  # ignored
        for key, value in changes.items():
            node = r if key.startswith("env.") else r["config"]
            parts = key.split(".")
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = value
        write_result(tmp_path, r)
    t = protocol_diff_table(load_runs(tmp_path))
    assert set(t.data.key) == {"train.lr", "env.backbone.sha256", "benchmark.normalize", "method.batchwise_prompt",
                               "method.pool_size"}
    row = t.data.set_index("key")
    assert row.at["method.batchwise_prompt", "gamma"] == "true" and row.at["method.batchwise_prompt", "alpha"] == "false"
    assert row.at["env.backbone.sha256", "gamma"] == "0" * 12  # shortened for display
    assert row.at["method.pool_size", "alpha@v2"] == "30"


def test_protocol_diff_of_the_report_shows_the_training_budget_and_not_the_shared_class_orders(world):
    diff = pd.read_csv(world["out"] / "tables" / "protocol_diff.csv", dtype=str).set_index("key")
    lp_epochs = world["results"]["linear_probe"][0]["config"]["train"]["epochs"]
    assert lp_epochs != NCM_EPOCHS
    assert list(diff.index) == ["train.epochs"]  # every other setting, class orders per seed included, is shared
    assert diff.at["train.epochs", "ncm"] == str(NCM_EPOCHS)
    assert diff.at["train.epochs", "linear_probe"] == diff.at["train.epochs", "fake_prompt"] == str(lp_epochs)


# --- paired comparison ------------------------------------------------------------------------

def test_paired_ci_matches_a_hand_computation(world):
    s = pd.read_csv(world["out"] / "tables" / "compare_fake_prompt_vs_linear_probe.csv").set_index("metric")
    lp = {r["seed"]: r["acc_matrix"] for r in world["results"]["linear_probe"]}
    for m, fn in METRIC_FN.items():
        d = np.array([fn(FAKE[k]) - fn(lp[k]) for k in (0, 1)])
        sd = math.sqrt(((d - d.mean()) ** 2).sum() / (len(d) - 1))
        t1 = math.tan(math.pi * (0.975 - 0.5))  # Student t with 1 dof is Cauchy: closed-form quantile 12.706
        assert s.at[m, "n"] == 2
        assert s.at[m, "mean_diff"] == pytest.approx(d.mean())
        assert s.at[m, "t_crit"] == pytest.approx(t1, rel=1e-9)
        assert s.at[m, "ci_lo"] == pytest.approx(d.mean() - t1 * sd / math.sqrt(2))
        assert s.at[m, "ci_hi"] == pytest.approx(d.mean() + t1 * sd / math.sqrt(2))
    per_seed = pd.read_csv(world["out"] / "tables" / "compare_fake_prompt_vs_linear_probe_per_seed.csv")
    assert len(per_seed) == 2 * len(METRIC_FN)


def test_t_interval_for_three_seeds_and_pareto_front():
    from reports.stats import paired_ci, pareto_front

    ci = paired_ci([3.0, 5.0, 7.0], [1.0, 1.0, 1.0])  # d = 2, 4, 6: mean 4, sd 2
    assert ci.mean == pytest.approx(4.0) and ci.sd == pytest.approx(2.0)
    # Student t with 2 dof has F(t) = 1/2 + t / (2·sqrt(t² + 2)), so t_p = α·sqrt(2 / (1 − α²)) with α = 2p − 1
    alpha = 2 * 0.975 - 1
    t2 = alpha * math.sqrt(2 / (1 - alpha ** 2))
    assert ci.t_crit == pytest.approx(t2) and t2 == pytest.approx(4.3027, abs=1e-4)
    assert ci.lo == pytest.approx(4.0 - t2 * 2.0 / math.sqrt(3)) and ci.hi == pytest.approx(4.0 + t2 * 2.0 / math.sqrt(3))
    # cost (lower better), accuracy (higher better): (1, 50) and (2, 60) and (4, 70) are the front; (3, 55) is dominated
    assert pareto_front([2, 1, 3, 4, float("nan")], [60, 50, 55, 70, 99]) == [1, 0, 3]


# --- plots and html ---------------------------------------------------------------------------

def test_every_plot_is_a_valid_nonempty_png_and_pdf(world):
    plots = world["out"] / "plots"
    names = {p.stem for p in plots.glob("*.png")}
    assert names == {"curves_synthetic-3t", "heatmap_synthetic-3t", "forgetting_synthetic-3t", "pareto_synthetic-3t",
                     "usage_synthetic-3t_fake_prompt", "taskid_synthetic-3t", "growth"}
    for n in names:
        png, pdf = plots / f"{n}.png", plots / f"{n}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.load()
            assert im.size[0] > 200 and im.size[1] > 150
            assert len(set(im.convert("L").getdata())) > 10  # not a blank canvas
        raw = pdf.read_bytes()
        assert raw[:5] == b"%PDF-" and b"%%EOF" in raw[-32:] and len(raw) > 2000


def test_usage_histograms_sum_heads_and_seeds():
    from reports.plots import usage_arrays

    h0 = [[[1, 0, 2], [0, 1, 0]], [[0, 0, 1], [3, 0, 0]]]  # (layers 2, heads 2, experts 3)
    res = [{"diagnostics": {"selection_hist": {"final": {"0": h0}}}}] * 2 + [{"diagnostics": {"selection_hist": None}}]
    u = usage_arrays(res)
    assert list(u) == [0]
    assert u[0].tolist() == [[2, 2, 4], [6, 0, 2]]  # per layer: heads summed, two seeds summed
    one = usage_arrays([{"diagnostics": {"selection_hist": {"final": FAKE_HIST}}}])
    assert one[2].tolist() == [[0, 0, 1, 5]]


def test_report_html_is_self_contained_with_tables_and_embedded_images(world):
    html = (world["out"] / "report.html").read_text()
    for title in ("Main comparison", "Reproduction: reported vs ours", "Protocol differences", "Paired difference",
                  "Cost (from bench.py cost)"):
        assert title in html
    assert html.count("<table class='data'") >= 6
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    pngs = sorted((world["out"] / "plots").glob("*.png"))
    assert len(imgs) == len(pngs)
    assert {base64.b64decode(i) for i in imgs} == {p.read_bytes() for p in pngs}
    assert not re.search(r"(src|href)=['\"]https?://", html)  # nothing fetched from a server
    assert "79.00 ± 1.89" in html  # fake_prompt FAA: mean 79.0, sample std |80.333−77.667|/√2


def test_cli_prints_the_main_table_and_the_report_path(world):
    out = world["stdout"]
    assert "### Main comparison" in out and "fake_prompt" in out
    assert str((world["out"] / "report.html").resolve()) in out.splitlines()[-1]
    for ext in ("md", "tex", "csv"):
        assert (world["out"] / "tables" / f"main.{ext}").stat().st_size > 0
    assert len(pd.read_csv(world["out"] / "acc_long.csv")) == 8 * 6  # 8 runs × 6 lower-triangle entries


@pytest.mark.parametrize("case", ["missing", "empty", "unknown_compare", "bad_metric"])
def test_bad_report_input_is_one_sentence_and_exit_2(world, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    runs = {"missing": tmp_path / "nope", "empty": tmp_path / "empty"}.get(case, world["runs"])
    extra = {"unknown_compare": ["--compare", "fake_prompt", "nosuch"], "bad_metric": ["--metrics", "faa,acc"]}.get(case, [])
    out = tmp_path / "out"
    code = bench.main(["report", "--runs", str(runs), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and err.endswith(".")
    assert not out.exists()  # nothing written


def test_main_table_kind_marks_and_task_identity_points(world):
    from reports.loader import load_runs
    from reports.plots import task_identity_points

    md = md_rows((world["out"] / "tables" / "main.md").read_text())
    assert md["fake_prompt"]["kind"] == "¹ˢ"  # first task only, class statistics (its method_traits)
    assert md[_display("linear_probe")]["kind"] == ""  # a real run: none of the three
    assert "Task-identity accuracy" in (world["out"] / "report.html").read_text()
    pts = task_identity_points(load_runs(world["runs"]), "synthetic-3t")
    assert [p[0] for p in pts] == ["fake_prompt"]  # only the method that infers a task
    _, faa_mean, tia_mean, per_task = pts[0]
    assert faa_mean == pytest.approx(79.0)
    assert tia_mean == pytest.approx(((150.0 / 3) + (160.0 / 3)) / 2)
    assert per_task == pytest.approx([100.0, 55.0, 0.0])  # seeds 0 and 1: task 2 at 50 and 60

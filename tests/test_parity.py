"""The parity harness (benchmarks/tools/parity.py) on small reference stand-ins written here.

No authors' checkout is needed: a stand-in :class:`Side` (a linear head on pixels, with its own
initialisation, schedule, loader and transforms) plays the reference, with one difference planted
at a time; the harness must report exactly that check as FAIL (or DEVIATION where documented) and
every other check as PASS. Expected differences are computed here from closed forms.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch import Tensor

from benchmarks.tools.parity import (DEVIATION, FAIL, PASS, Row, Side, Step, compare_init, ks_critical, ks_distance,
                               markdown_table, run_sides, probe_image)

ROOT = Path(__file__).resolve().parents[1]
C, D, TASKS, S = 4, 12, 2, 16  # classes, features, tasks, image size of the stand-in


def coda_lr(e: int, k: int) -> float:
    """CODA-Prompt's effective per-epoch lr factor (its loop steps the scheduler from epoch 1 on)."""
    return math.cos(99 * math.pi * max(e - 1, 0) / (200 * (k - 1)))


class StandIn(Side):
    """A linear head on the first D pixels, trained by SGD(lr · schedule), with a masked CE."""

    def __init__(self, init: str = "trunc_normal", schedule: Optional[Callable[[int, int], float]] = None,
                 interp: T.InterpolationMode = T.InterpolationMode.BICUBIC, reinit_at_boundary: bool = False,
                 drop_last: bool = False, epochs: int = 5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        if init == "trunc_normal":  # timm's head init: trunc_normal(std 0.02), zero bias
            w = torch.nn.init.trunc_normal_(torch.empty(C, D), std=0.02, generator=g)
            b = torch.zeros(C)
        else:  # nn.Linear's default: U(-1/sqrt(D), 1/sqrt(D)) for weight and bias
            bound = 1 / math.sqrt(D)
            w = torch.empty(C, D).uniform_(-bound, bound, generator=g)
            b = torch.empty(C).uniform_(-bound, bound, generator=g)
        self.w, self.b = w.requires_grad_(), b.requires_grad_()
        self.init = {"head.weight": w.detach().clone(), "head.bias": b.detach().clone()}
        self.schedule = schedule or coda_lr
        self.interp, self.reinit, self.drop_last, self.epochs = interp, reinit_at_boundary, drop_last, epochs
        self.image_size, self.base_lr, self.batch_size, self.task = S, 0.1, 16, 0

    def tensors(self) -> Dict[str, Tensor]:
        return {"head.weight": self.w.detach().clone(), "head.bias": self.b.detach().clone()}

    def set_tensors(self, values: Dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.w.copy_(values["head.weight"])
            self.b.copy_(values["head.bias"])

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        if t > 0 and self.reinit:
            with torch.no_grad():
                self.w.copy_(torch.nn.init.trunc_normal_(torch.empty(C, D), std=0.02,
                                                          generator=torch.Generator().manual_seed(100 + t)))
        self.task = t

    def _logits(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :D] @ self.w.T + self.b

    def eval_logits(self, x: Tensor) -> Tensor:
        return self._logits(x)

    def train_step(self, x: Tensor, y: Tensor) -> Step:
        logits = self._logits(x)
        per = C // TASKS
        mask = torch.full((C,), float("-inf"))
        mask[self.task * per:(self.task + 1) * per] = 0
        loss = F.cross_entropy(logits + mask, y)
        self.w.grad = self.b.grad = None
        loss.backward()
        grads = {"head.weight": self.w.grad.clone(), "head.bias": self.b.grad.clone()}
        with torch.no_grad():
            self.w -= self.base_lr * self.w.grad
            self.b -= self.base_lr * self.b.grad
        return Step(logits.detach(), {"ce": loss.detach()}, grads, self.tensors())

    def lrs(self, steps_per_epoch: int) -> Dict[str, Tensor]:
        lr = torch.tensor([self.base_lr * self.schedule(e, self.epochs) for e in range(self.epochs)], dtype=torch.float64)
        return {"head.weight": lr, "head.bias": lr.clone()}

    def steps_per_epoch(self, images: int) -> int:
        return images // self.batch_size if self.drop_last else -(-images // self.batch_size)

    def transform(self, image: np.ndarray, train: bool, seed: int) -> Tensor:
        if train:
            ops = [T.RandomResizedCrop(S, scale=(0.05, 1.0), antialias=True), T.RandomHorizontalFlip()]
        else:
            ops = [T.Resize(int(S * 256 / 224), interpolation=self.interp, antialias=True), T.CenterCrop(S)]
        torch.manual_seed(seed)
        return T.Compose(ops + [T.ToDtype(torch.float32, scale=True)])(torch.from_numpy(image).permute(2, 0, 1))


def check(ours: Side, ref: Side, deviations: Optional[Dict[str, str]] = None):
    return run_sides("toy", ours, ref, C, TASKS, "cifar100", deviations or {}, batch=3)


def by_check(rows):
    out: Dict[str, list] = {}
    for r in rows:
        out.setdefault(r.check, []).append(r)
    return out


def failing(rows):
    return sorted({r.check for r in rows if r.status != PASS})


def test_identical_stand_ins_pass_every_check():
    rows = check(StandIn(seed=0), StandIn(seed=0))
    assert failing(rows) == []
    checks = set(by_check(rows))
    for name in ("init", "boundary/changed", "boundary/values", "logits/eval", "logits/train", "loss/ce", "grad",
                 "step", "lr", "loader", "transform/train", "transform/test"):
        assert name in checks


def test_planted_off_by_one_schedule_fails_with_the_hand_computed_difference():
    # the reference steps its cosine at every epoch start (e), ours from epoch 1 on (max(e-1, 0))
    shifted = lambda e, k: math.cos(99 * math.pi * e / (200 * (k - 1)))  # noqa: E731
    rows = check(StandIn(), StandIn(schedule=shifted))
    assert failing(rows) == ["lr"]
    # epochs 0..4 of 5: factors cos(99π·max(e-1,0)/800) vs cos(99π·e/800); the gap grows with e,
    # largest at e = 4: cos(297π/800) - cos(396π/800)
    expected = 0.1 * (math.cos(297 * math.pi / 800) - math.cos(396 * math.pi / 800))
    lr_rows = by_check(rows)["lr"]
    assert {r.tensor for r in lr_rows} == {"head.weight", "head.bias"}
    for r in lr_rows:
        assert r.status == FAIL
        assert r.max_abs == pytest.approx(expected, rel=1e-9)


def test_planted_interpolation_change_fails_only_the_test_transform():
    rows = check(StandIn(interp=T.InterpolationMode.BICUBIC), StandIn(interp=T.InterpolationMode.BILINEAR))
    assert failing(rows) == ["transform/test"]
    [row] = by_check(rows)["transform/test"]
    assert row.status == FAIL and row.tol == pytest.approx(3 / 255)
    # the same image through the two resizes, side by side (no harness code involved)
    img = torch.from_numpy(probe_image("cifar100")).permute(2, 0, 1)
    size = int(S * 256 / 224)
    a = T.functional.center_crop(T.functional.resize(img, size, T.InterpolationMode.BICUBIC, antialias=True), S)
    b = T.functional.center_crop(T.functional.resize(img, size, T.InterpolationMode.BILINEAR, antialias=True), S)
    assert row.max_abs == pytest.approx(float((a.float() - b.float()).abs().max()) / 255, abs=1e-6)
    assert row.max_abs > 3 / 255


def test_planted_init_difference_fails_the_init_check_only():
    # nn.Linear's default init against timm's trunc_normal(0.02) / zero bias: copying the weights
    # before the forward comparison makes every later check agree
    rows = check(StandIn(init="torch_default"), StandIn(init="trunc_normal"))
    assert failing(rows) == ["init"]
    init = {r.tensor: r for r in by_check(rows)["init"]}
    assert init["head.bias"].status == FAIL  # uniform values against zeros: compared as constants
    assert init["head.bias"].max_abs == pytest.approx(float(StandIn(init="torch_default").init["head.bias"].abs().max()))
    assert init["head.weight"].status == FAIL


def test_init_statistics_accept_the_same_distribution_and_reject_another():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20000, generator=g) * 0.02, torch.randn(20000, generator=g) * 0.02
    u = (torch.rand(20000, generator=g) * 2 - 1) * 0.02 * math.sqrt(3)  # same std 0.02, uniform
    same = compare_init("c", {"t": a}, {"t": b}, {})
    other = compare_init("c", {"t": u}, {"t": b}, {})
    assert same[0].status == PASS and other[0].status == FAIL
    # a std only 20 % larger is also a failure (the std criterion, 10 %)
    wider = compare_init("c", {"t": a * 1.2}, {"t": b}, {})
    assert wider[0].status == FAIL


def test_ks_distance_and_critical_value_by_hand():
    # ECDFs of {1,2,3} and {2,3,4}: at x in [1, 2) they are 1/3 and 0 -> sup 1/3
    assert ks_distance(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 3, 4])) == pytest.approx(1 / 3)
    assert ks_distance(torch.tensor([0.0, 1]), torch.tensor([5.0, 6])) == pytest.approx(1.0)
    # c(α) = sqrt(-ln(α/2)/2); α = 0.001 -> 1.9495; n = m = 100 -> c·sqrt(2/100)
    assert ks_critical(100, 100) == pytest.approx(math.sqrt(-math.log(0.0005) / 2) * math.sqrt(0.02))


def test_boundary_reinit_and_drop_last_are_detected():
    rows = check(StandIn(), StandIn(reinit_at_boundary=True))
    # re-drawn on one side only: the changed fraction and the values after the boundary differ
    assert failing(rows) == ["boundary/changed", "boundary/values"]
    changed = {r.tensor: r for r in by_check(rows)["boundary/changed"]}
    assert changed["head.weight"].max_abs == pytest.approx(1.0)  # every element re-drawn on one side only
    assert changed["head.bias"].status == PASS
    rows = check(StandIn(), StandIn(drop_last=True))
    assert failing(rows) == ["loader"]
    [row] = by_check(rows)["loader"]
    assert row.max_abs == 1.0  # ceil(5003/16) = 313 against 5003 // 16 = 312


class BoundaryTrained(StandIn):
    """Trains the bias at the boundary: one gradient step of lr on ½|b − target|² (target 1..C),
    so from b = 0 the bias after the boundary is exactly lr · target."""

    def __init__(self, boundary_lr: float, declare: bool = True, **kw) -> None:
        super().__init__(**kw)
        self.boundary_lr = boundary_lr
        self.boundary_trained = ("head.bias",) if declare else ()

    def start_task(self, t: int, prev: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        super().start_task(t, prev)
        if t > 0:
            with torch.no_grad():
                self.b -= self.boundary_lr * (self.b - torch.arange(1.0, C + 1))


def test_tensors_trained_at_the_boundary_are_compared_by_value():
    same = check(BoundaryTrained(0.1), BoundaryTrained(0.1))
    assert failing(same) == [] and [r.tensor for r in by_check(same)["boundary/trained"]] == ["head.bias"]
    # lr 0.1 against 0.105: the biases differ by 0.005 · 4 = 0.02; the allowance is
    # 1e-6 + 1e-4 · 0.42 + 1 % of the reference's change (0.42)
    rows = check(BoundaryTrained(0.1), BoundaryTrained(0.105))
    assert failing(rows) == ["boundary/trained"]
    [row] = by_check(rows)["boundary/trained"]
    assert row.max_abs == pytest.approx(0.02, rel=1e-5)
    assert row.tol == pytest.approx(1e-6 + 1e-4 * 0.42 + 0.01 * 0.42, rel=1e-5)
    # undeclared, the same difference looks like a re-draw: 4 values, std ratio 1.05, and passes
    rows = check(BoundaryTrained(0.1), BoundaryTrained(0.105, declare=False))
    assert failing(rows) == [] and "boundary/trained" not in by_check(rows)
    assert [r.tensor for r in by_check(rows)["boundary/redrawn"]] == ["head.bias"]


def test_documented_difference_is_a_deviation_with_its_link():
    link = "docs/methods-x.md#test-time-resize"
    rows = check(StandIn(), StandIn(interp=T.InterpolationMode.BILINEAR), {"transform/*": link})
    [row] = by_check(rows)["transform/test"]
    assert row.status == DEVIATION and link in row.note
    assert by_check(rows)["transform/train"][0].status == PASS  # within tolerance stays PASS


class Normalised(StandIn):
    """A stand-in whose transform normalises with (mean, std) and which undoes it in ``pixels``."""

    def __init__(self, mean: float, std: float, **kw) -> None:
        super().__init__(**kw)
        self.mean, self.std = mean, std

    def transform(self, image, train, seed):
        return (super().transform(image, train, seed) - self.mean) / self.std

    def pixels(self, t):
        return t * self.std + self.mean


def test_transforms_compare_in_pixel_units_of_our_normalisation():
    # the same normalisation on both sides: back in pixels the outputs agree
    assert failing(check(Normalised(0.5, 0.25), Normalised(0.5, 0.25))) == []
    # a reference normalising with std 0.5 instead: read with ours (0.25), its pixels are
    # 0.5 + (x - 0.5)·0.5 instead of x, off by 0.5·|x - 0.5|
    rows = check(Normalised(0.5, 0.25), Normalised(0.5, 0.5))
    assert failing(rows) == ["transform/test", "transform/train"]
    [row] = by_check(rows)["transform/test"]
    img = torch.from_numpy(probe_image("cifar100")).permute(2, 0, 1)
    size = int(S * 256 / 224)
    x = T.functional.center_crop(T.functional.resize(img, size, T.InterpolationMode.BICUBIC, antialias=True), S).float() / 255
    assert row.max_abs == pytest.approx(float((0.5 * (x - 0.5)).abs().max()), abs=1e-6)


def test_missing_and_misshapen_tensors_fail():
    rows = compare_init("c", {"a": torch.zeros(3), "b": torch.zeros(2)}, {"a": torch.zeros(4), "c": torch.zeros(1)}, {})
    notes = {r.tensor: (r.status, r.note) for r in rows}
    assert notes["a"][0] == FAIL and "shape" in notes["a"][1]
    assert notes["b"] == (FAIL, "only in ours")
    assert notes["c"] == (FAIL, "only in the reference")


def test_markdown_folds_passing_rows_and_keeps_failures():
    rows = [Row("c", "grad", "a", 1e-9, 1e-6, PASS), Row("c", "grad", "b", 5e-7, 1e-6, PASS),
            Row("c", "grad", "z", 1.0, 1e-6, FAIL)]
    text = markdown_table(rows)
    assert "| c | grad | 2 tensors (worst: b) | 5e-07 | 1e-06 | PASS |" in text
    assert "| c | grad | z | 1 | 1e-06 | **FAIL** |" in text
    # the same failure of many tensors (one schedule for all) is one row; a different one is not
    same = [Row("c", "lr", n, 3e-5, 2e-12, FAIL) for n in ("a", "b", "c")] + [Row("c", "lr", "d", 1e-3, 2e-12, FAIL)]
    text = markdown_table(same)
    assert "| c | lr | 3 tensors (first: a) | 3e-05 | 2e-12 | **FAIL** |" in text
    assert "| c | lr | d | 0.001 | 2e-12 | **FAIL** |" in text


def test_record_markdown_names_reference_and_suite_commits_and_counts():
    from benchmarks.tools.parity import record_markdown

    rows = [Row("c", "init", "a", 0.5, 1, PASS), Row("c", "lr", "a", 1e-3, 2e-12, FAIL),
            Row("c", "step", "a", 1.0, 1e-6, DEVIATION, "docs/methods-x.md#y")]
    rec = {"command": "bench.py parity x --ref R", "repo": "o/n", "commit": "abc", "date": "2026-12-05 15:00 UTC",
           "torch": "2", "batch": 2, "seed": 0, "seconds": 1.5, "summary": {PASS: 1, DEVIATION: 1, FAIL: 1},
           "rows": [r.__dict__ for r in rows], "suite": {"commit": "def", "dirty": True}}
    text = record_markdown(rec)
    assert "Reference: `o/n` @ `abc`; run 2026-12-05 15:00 UTC" in text
    assert "Suite: commit `def` (with uncommitted changes)." in text
    assert "**1 PASS, 1 DEVIATION, 1 FAIL**" in text
    assert "[docs/methods-x.md#y](methods-x.md#y)" in text  # links relative to docs/
    rec["suite"] = {"commit": "def", "dirty": False}
    assert "Suite: commit `def`." in record_markdown(rec)
    del rec["suite"]  # records written before the field: no suite line
    assert "Suite:" not in record_markdown(rec)


def test_our_side_against_itself_passes_and_sees_a_changed_head_init(micro_backbone, tiny_config):
    """OurSide on the real L2P code (micro ViT): two builds agree on every check; a head
    initialised like timm's on one side is caught by the init check alone."""
    from benchmarks.tools.parity import OurSide

    cfg = tiny_config("l2p", {"benchmark": {"num_tasks": 2}, "train": {"epochs": 3, "schedule": "step",
                                                                        "milestones": [1], "gamma": 0.5}})
    vit = micro_backbone.vit
    ours, other = OurSide("l2p", cfg, vit), OurSide("l2p", cfg, vit)
    rows = run_sides("l2p", ours, other, ours.num_classes, 2, "synthetic", {}, batch=2)
    assert failing(rows) == []
    lr = by_check(rows)["lr"][0]
    assert lr.status == PASS
    # the step schedule by hand: lr, lr/2, lr/2 (milestone at epoch 1, gamma 0.5)
    base = cfg.train.lr
    assert torch.allclose(ours.lrs(3)["head.weight"], torch.tensor([base, base / 2, base / 2], dtype=torch.float64))
    timm_like = OurSide("l2p", cfg, vit)
    timm_like.init = dict(timm_like.init, **{"head.weight": torch.nn.init.trunc_normal_(torch.empty_like(ours.init["head.weight"]), std=0.02),
                                            "head.bias": torch.zeros_like(ours.init["head.bias"])})
    rows = compare_init("l2p", ours.init, timm_like.init, {})
    assert {r.tensor for r in rows if r.status == FAIL} == {"head.bias", "head.weight"}


def test_cli_missing_or_wrong_ref_is_one_sentence_and_exit_2(tmp_path, capsys):
    import bench

    reflike = tmp_path / "l2p-like"  # passes the l2p-pytorch check; the bad --set is caught before building
    (reflike / "configs").mkdir(parents=True)
    (reflike / "configs" / "cifar100_l2p.py").write_text("")

    for args, needle in ((["l2p", "--ref", str(tmp_path / "nope")], "is not a directory"),
                         (["l2p", "--ref", str(tmp_path)], "is not a checkout of JH-LEE-KR/l2p-pytorch or GT-RIPL/CODA-Prompt"),
                         (["smope", "--ref", str(tmp_path)], "configs/cifar-100_prompt_smope.yaml"),
                         (["no_such_method", "--ref", str(tmp_path)], "no parity adapter"),
                         (["l2p", "--ref", str(reflike), "--set", "method.no_such_key=1"], "no_such_key")):
        assert bench.main(["parity", *args]) == 2
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0] and lines[0].endswith(".")
        assert out.out == ""


def test_reference_layouts_map_element_by_element():
    """The adapters' layout maps, checked at single elements against the layouts as the reference
    code defines them (no checkout needed: the maps are plain tensor functions)."""
    from benchmarks.tools.parity_coda import coda_maps, pool_maps
    from benchmarks.tools.parity_jhlee import _e_to_ours, _g_to_ours

    # dualprompt-pytorch EPrompt: (layers, 2 = key/value, pool, L, H, d_h); ours (layers, pool, 2L, D),
    # rows [0, L) keys, [L, 2L) values, D = H·d_h
    ref = torch.randn(3, 2, 10, 5, 4, 6)
    ours = _e_to_ours(ref)
    assert ours.shape == (3, 10, 10, 24)
    assert ours[2, 7, 5 + 3, 1 * 6 + 4] == ref[2, 1, 7, 3, 1, 4]  # value token 3, head 1, channel 4
    assert ours[0, 9, 2, 3 * 6 + 5] == ref[0, 0, 9, 2, 3, 5]  # key token 2
    g = torch.randn(2, 2, 5, 4, 6)  # G-prompt (layers, 2, L, H, d_h) -> (layers, 2L, D)
    assert _g_to_ours(g)[1, 5 + 4, 2 * 6 + 1] == g[1, 1, 4, 2, 1]

    # CODA-P: e_p_<l> rows are components, task t owns rows [t·M/T, (t+1)·M/T)
    to_ours, to_theirs = coda_maps([0, 3], num_tasks=4)
    theirs = {f"prompt.e_{k}_{l}": torch.randn(8, 3) for k in "pka" for l in (0, 3)}
    theirs.update({"last.weight": torch.randn(5, 3), "last.bias": torch.randn(5)})
    mapped = to_ours(theirs)
    assert torch.equal(mapped["pools.3.k.2"], theirs["prompt.e_k_3"][4:6])
    assert torch.equal(mapped["head.bias"], theirs["last.bias"])
    back = to_theirs(mapped)
    assert set(back) == set(theirs) and all(torch.equal(back[n], theirs[n]) for n in theirs)

    # CODA's DualPrompt: e_p_<2,3,4> stacked into our e_prompt, g_p_<0,1> into g_prompt
    to_ours, to_theirs = pool_maps([2, 3, 4], [0, 1], "dualprompt")
    theirs = {f"prompt.e_p_{l}": torch.randn(10, 20, 3) for l in (2, 3, 4)}
    theirs.update({f"prompt.e_k_{l}": torch.randn(10, 3) for l in (2, 3, 4)})
    theirs.update({f"prompt.g_p_{l}": torch.randn(6, 3) for l in (0, 1)})
    mapped = to_ours(theirs)
    assert torch.equal(mapped["e_prompt"][1], theirs["prompt.e_p_3"]) and torch.equal(mapped["keys"][2], theirs["prompt.e_k_4"])
    assert torch.equal(mapped["g_prompt"][1], theirs["prompt.g_p_1"])
    back = to_theirs(mapped)
    assert all(torch.equal(back[n], theirs[n]) for n in theirs)


def test_smope_expert_tensors_map_to_layer_head_expert():
    """SMoPE's OnePrompt keeps one (1, d_h) parameter per (layer, expert, head):
    ``e_pk_<layer>_<expert>_<head>``; ours one (layers, heads, experts, d_h) tensor."""
    from types import SimpleNamespace

    from benchmarks.tools.parity_smope import SMoPEAdapter

    layers, heads, experts, dh = [0, 1, 2], 2, 3, 4
    ours = SimpleNamespace(init={"keys": torch.zeros(len(layers), heads, experts, dh)},
                           cfg=SimpleNamespace(method=SimpleNamespace(layers=layers)))
    to_ours, to_theirs = SMoPEAdapter().maps(ours)
    theirs = {f"prompt.e_{k}_{l}_{x}_{h}": torch.randn(1, dh)
              for k in ("pk", "pv") for l in layers for x in range(experts) for h in range(heads)}
    mapped = to_ours(theirs)
    assert torch.equal(mapped["keys"][2, 1, 0], theirs["prompt.e_pk_2_0_1"][0])
    assert torch.equal(mapped["values"][1, 0, 2], theirs["prompt.e_pv_1_2_0"][0])
    back = to_theirs(mapped)
    assert set(back) == set(theirs) and all(torch.equal(back[n], theirs[n]) for n in theirs)


def _doc_anchors(path: Path) -> set:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to '-'."""
    import re

    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in (re.match(r"^#+\s+(.*)", line) for line in path.read_text().splitlines()) if m}


def test_every_deviation_links_a_docs_heading_and_has_a_case_without_it():
    """A DEVIATION row must link a paragraph that exists, and a documented option the preset
    leaves off must be compared once more with the option set and nothing excused, so that a real
    difference cannot hide behind the documented one."""
    from benchmarks.tools.parity import load_adapters

    for method, adapters in load_adapters().items():
        for adapter in adapters:
            cases = adapter.cases()
            for case in cases:
                for glob, doc in {**adapter.deviations, **case.deviations}.items():
                    target = doc.split()[0]
                    file, _, anchor = target.partition("#")
                    assert (ROOT / file).is_file(), (method, case.label, glob, doc)
                    assert anchor in _doc_anchors(ROOT / file), (method, case.label, glob, doc)
                if case.deviations:
                    twins = [c for c in cases if c.preset == case.preset and c.benchmark == case.benchmark
                             and c.overrides and not c.deviations and not adapter.deviations]
                    assert twins, (method, adapter.repo, case.label)
    # NoRGa: per script, the preset (reshape off: downstream rows excused) and reshape_quirk=true
    norga = load_adapters()["norga"][0].cases()
    assert [(c.benchmark, c.overrides) for c in norga] == [
        (b, o) for b in ("cifar100", "imagenet_r", "cub200") for o in ({}, {"method": {"reshape_quirk": True}})]
    assert sorted(norga[0].deviations) == ["grad", "logits/*", "loss/*", "step"] and not norga[1].deviations

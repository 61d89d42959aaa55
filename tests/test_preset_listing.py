"""Presets never fall back to a dataclass default; `bench.py list presets --resolved` and
docs/presets.md (generated from it) stay in step."""
from pathlib import Path

import pytest

from benchmarks.config import ConfigError, REQUIRED_KEYS, TRAINING_KEYS, resolve_config, resolve_with_sources

ROOT = Path(__file__).resolve().parent.parent


def test_docs_presets_md_is_the_generated_listing():
    from benchmarks.tables.preset_listing import render_markdown

    want = render_markdown()
    have = (ROOT / "docs" / "presets.md").read_text()
    assert have == want, "docs/presets.md is stale: python bench.py list presets --resolved --markdown > docs/presets.md"


def test_coda_preset_on_cub200_is_an_explicit_entry():
    """Issue 21: `coda` on cub200 used to resolve to 5 tasks and the `default` test transform.
    SMoPE's and VQ-Prompt's CUB200 loaders (CODA forks): first/other_split_size 20 of 200 classes
    = 10 tasks, test Resize(256) + CenterCrop(224) (bilinear), schedule [20] epochs."""
    for method in ("l2p", "dualprompt", "coda_prompt"):
        cfg, src = resolve_with_sources(method, "cub200", "coda")
        assert (cfg.benchmark.num_tasks, cfg.benchmark.test_transform, cfg.train.epochs) == (10, "resize_crop", 20)
        assert src["benchmark.num_tasks"] == src["benchmark.test_transform"] == src["train.epochs"] == "_benchmarks.yaml:coda:cub200"
        assert cfg.train.drop_last is True and cfg.precision == "fp32"


def test_a_missing_entry_is_one_sentence_naming_it():
    # CODA-Prompt has no CUB-200 config, and its paper preset names no cub200 entry
    with pytest.raises(ConfigError) as e:
        resolve_config("coda_prompt", "cub200", "paper")
    msg = str(e.value)
    assert msg.startswith("preset 'paper' leaves benchmark.test_transform, train.epochs unset for method 'coda_prompt' on 'cub200'")
    assert "\n" not in msg and msg.count(". ") == 0
    with pytest.raises(ConfigError, match=r"^preset 'coda' has no entry for benchmark 'fashion_mnist' \(method 'l2p'"):
        resolve_config("l2p", "fashion_mnist", "coda")
    # the command line may supply what the preset lacks
    ok = resolve_config("coda_prompt", "cub200", "paper", {"train": {"epochs": 20}, "benchmark": {"test_transform": "resize_crop"}})
    assert ok.train.epochs == 20


def test_cli_run_without_an_entry_exits_2_and_writes_nothing(tmp_path, capsys):
    import bench

    out = tmp_path / "runs"
    assert bench.main(["run", "-b", "cub200", "-m", "coda_prompt", "--preset", "paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "preset 'paper' leaves benchmark.test_transform, train.epochs unset" in err
    assert not out.exists() or not any(out.rglob("*"))


def test_sources_name_the_file_and_key_of_each_value():
    cfg, src = resolve_with_sources("smope", "cifar100", "paper", {"train": {"lr": 0.01}})
    assert src["train.epochs"] == "smope.yaml:paper:cifar100"
    assert src["precision"] == "_benchmarks.yaml:paper:*"
    assert src["train.lr"] == "command line (--set / flags)"
    assert "train.clip_grad" not in src  # a default that is not a required setting: shown as such
    cfg, src = resolve_with_sources("smope", "imagenet_r", "paper", {"benchmark": {"num_tasks": 5}})
    assert src["train.iter_step"] == "smope.yaml:paper:imagenet_r@5" and cfg.train.iter_step == 80


def test_smope_main_dry_run_cells_all_resolve_from_preset_files():
    from benchmarks.tables.reproduce import load_table, resolve_run

    t = load_table("smope-main")
    n = 0
    for row in t.rows:
        if not row.ours:
            continue
        for col in t.columns:
            cfg = resolve_run(t, row, col, 0, "data", "checkpoints")  # strict: raises on a silent default
            from benchmarks.tables.reproduce import run_overrides

            _, src = resolve_with_sources(row.ours, col.benchmark, row.preset or "paper",
                                          run_overrides(row, col, "data", "checkpoints"))
            keys = REQUIRED_KEYS + (TRAINING_KEYS if cfg.train.epochs > 0 else ())
            assert all(k in src for k in keys), (row.label, col.id)
            assert cfg.benchmark.num_tasks == 10 and cfg.precision == "fp32"
            n += 1
    assert n == 8 * 3  # every row of the poster table (OVOR and NoRGa since issue 16)


def test_listing_cli_prints_values_with_sources(capsys):
    import bench

    assert bench.main(["list", "presets", "--resolved", "-m", "hide_prompt", "-b", "cifar100", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("| hide_prompt | cifar100 |"))
    assert "resize_crop_bicubic: Resize(S·256/224) + CenterCrop(S), bicubic<br>`hide_prompt.yaml:cifar100`" in row
    assert "0.03 × 192/2048 = 0.0028125<br>`hide_prompt.yaml:*`" in row
    assert "hide_cifar: RandomResizedCrop(scale 0.08–1, bicubic)" in row
    assert "fp32<br>`_benchmarks.yaml:*`" in row and "false<br>`hide_prompt.yaml:*`" in row

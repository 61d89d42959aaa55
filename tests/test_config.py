"""Config resolution: preset layering, --set parsing, key and type validation."""
import pytest

from benchmarks.config import ConfigError, TrainConfig, apply_mapping, coerce, parse_set, resolve_config, run_config_from_dict
from conftest import make_tiny_config


def test_parse_set_builds_nested_typed_values():
    got = parse_set(["train.lr=0.01", "method.variant=deep", "train.betas=[0.8, 0.9]", "benchmark.num_classes=null",
                     "train.clip_grad=1"])
    assert got == {"train": {"lr": 0.01, "betas": [0.8, 0.9], "clip_grad": 1}, "method": {"variant": "deep"},
                   "benchmark": {"num_classes": None}}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown setting 'train.lrr'.*valid keys under 'train' are: epochs"):
        resolve_config("linear_probe", "synthetic", "quick", {"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match="unknown setting 'method.pool'"):
        resolve_config("linear_probe", "synthetic", "quick", {"method": {"pool": 3}})


@pytest.mark.parametrize("key,value,msg", [
    ("lr", "fast", "expects a number"),
    ("epochs", 2.5, "expects an integer"),
    ("epochs", True, "expects an integer"),
    ("drop_last", "yes", "expects true or false"),
    ("betas", [0.9], "expects a tuple of 2"),
])
def test_wrong_types_are_rejected(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_mapping(TrainConfig(), {key: value}, "train")


def test_coerce_converts_int_to_float_and_list_to_tuple():
    t = TrainConfig()
    apply_mapping(t, {"lr": 1, "betas": [0.5, 0.6], "clip_grad": None}, "train")
    assert isinstance(t.lr, float) and t.lr == 1.0 and t.betas == (0.5, 0.6) and t.clip_grad is None


def test_preset_layers_resolve_in_order():
    # _benchmarks.yaml quick/* sets lr 0.003; linear_probe.yaml quick/* overrides to 0.01; --set wins.
    base = resolve_config("linear_probe", "synthetic", "quick")
    assert base.train.lr == 0.01 and base.benchmark.num_classes == 30 and base.backbone.name == "vit_micro_patch8_32"
    assert resolve_config("finetune", "synthetic", "quick").train.lr == 0.0003
    over = resolve_config("linear_probe", "synthetic", "quick", {"train": {"lr": 0.5}})
    assert over.train.lr == 0.5


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown preset 'fast'; available presets:"):
        resolve_config("linear_probe", "synthetic", "fast")


def test_method_name_cannot_be_set():
    with pytest.raises(ConfigError, match="'method_name' cannot be set"):
        resolve_config("linear_probe", "synthetic", "quick", {"method_name": "ncm"})


def test_config_round_trips_through_dict():
    cfg = make_tiny_config("joint", {"method": {"finetune_backbone": False}, "train": {"lr": 0.2}})
    again = run_config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.method.finetune_backbone is False


def test_task_count_preset_layers_apply_on_top_of_the_benchmark(tmp_path, monkeypatch):
    import benchmarks.config as C

    (tmp_path / "_benchmarks.yaml").write_text(
        "quick:\n"
        "  '*': {train: {lr: 0.1}}\n"
        "  synthetic: {benchmark: {num_tasks: 10}, train: {epochs: 2}}\n"
        "  synthetic@5: {train: {epochs: 7}}\n")
    (tmp_path / "ncm.yaml").write_text(
        "presets:\n  quick:\n    synthetic@10: {train: {lr: 0.5}}\n    synthetic@5: {train: {lr: 0.9}}\n")
    monkeypatch.setattr(C, "PRESET_DIR", tmp_path)
    # these hand-made files set only what the layering needs: strict=False lets the rest default
    ten = C.resolve_config("ncm", "synthetic", "quick", strict=False)
    assert (ten.benchmark.num_tasks, ten.train.epochs, ten.train.lr) == (10, 2, 0.5)
    five = C.resolve_config("ncm", "synthetic", "quick", {"benchmark": {"num_tasks": 5}}, strict=False)
    assert (five.benchmark.num_tasks, five.train.epochs, five.train.lr) == (5, 7, 0.9)
    # an explicit --set still wins over the task-count layer
    over = C.resolve_config("ncm", "synthetic", "quick", {"benchmark": {"num_tasks": 5}, "train": {"lr": 0.01}}, strict=False)
    assert over.train.lr == 0.01

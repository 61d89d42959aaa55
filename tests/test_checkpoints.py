"""Local backbone checkpoints: every format loads back exactly; anything incomplete is an error.

Each test writes a tiny checkpoint from the micro ViT in the real key layout of its format
(Google's npz names, iBOT / DINO teacher dicts, MoCo v3's ``module.base_encoder.`` keys, timm
safetensors / .bin), loads it into a differently initialised model and compares every tensor.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmarks.config import BackboneConfig
from methods.backbones import build_model, create_backbone
from methods.checkpoints import CheckpointError, detect_format, load_checkpoint_into

ARCH = "vit_micro_patch8_32"
D, HEADS, DEPTH = 64, 4, 6


def _model(seed: int, arch: str = ARCH) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch)


@pytest.fixture(scope="module")
def source() -> Dict[str, torch.Tensor]:
    """The weights every checkpoint is written from (randomised so no tensor is a constant)."""
    m = _model(1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_loaded(model: torch.nn.Module, expected: Dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def _load(path: Path, fmt: str = "auto") -> tuple:
    m = _model(2)
    used = load_checkpoint_into(m, path, fmt)
    return m, used


def google_npz(sd: Dict[str, torch.Tensor], extra_head: bool = True) -> Dict[str, np.ndarray]:
    """The arrays of a Google ViT .npz (``imagenet21k/ViT-B_16.npz`` layout) for timm weights.

    Written from the JAX model's parameter shapes: Conv kernels HWIO, Dense kernels (in, out),
    attention query/key/value kernels (D, heads, head_dim), out kernel (heads, head_dim, D).
    """
    hd = D // HEADS
    a = {k: v.numpy() for k, v in sd.items()}
    out = {
        "embedding/kernel": a["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": a["patch_embed.proj.bias"],
        "cls": a["cls_token"],
        "Transformer/posembed_input/pos_embedding": a["pos_embed"],
        "Transformer/encoder_norm/scale": a["norm.weight"],
        "Transformer/encoder_norm/bias": a["norm.bias"],
    }
    for i in range(DEPTH):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = a[t + "norm1.weight"], a[t + "norm1.bias"]
        out[b + "LayerNorm_2/scale"], out[b + "LayerNorm_2/bias"] = a[t + "norm2.weight"], a[t + "norm2.bias"]
        qkv_w, qkv_b = a[t + "attn.qkv.weight"], a[t + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[b + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * D:(j + 1) * D].T.reshape(D, HEADS, hd)
            out[b + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * D:(j + 1) * D].reshape(HEADS, hd)
        out[b + "MultiHeadDotProductAttention_1/out/kernel"] = a[t + "attn.proj.weight"].T.reshape(HEADS, hd, D)
        out[b + "MultiHeadDotProductAttention_1/out/bias"] = a[t + "attn.proj.bias"]
        for r in range(2):
            out[b + f"MlpBlock_3/Dense_{r}/kernel"] = a[t + f"mlp.fc{r + 1}.weight"].T
            out[b + f"MlpBlock_3/Dense_{r}/bias"] = a[t + f"mlp.fc{r + 1}.bias"]
    if extra_head:  # the in21k file also holds a 21k head and the representation layer
        out["head/kernel"] = np.ones((D, 7), np.float32)
        out["head/bias"] = np.zeros(7, np.float32)
        out["pre_logits/kernel"] = np.ones((D, D), np.float32)
        out["pre_logits/bias"] = np.zeros(D, np.float32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _perturbed(sd: Dict[str, torch.Tensor], delta: float) -> Dict[str, torch.Tensor]:
    return {k: v + delta for k, v in sd.items()}


# --- every format loads back exactly -------------------------------------------------------

def test_timm_safetensors_with_head(tmp_path, source):
    p = tmp_path / "model.safetensors"
    save_file({**source, "head.weight": torch.ones(5, D), "head.bias": torch.zeros(5)}, str(p))
    m, used = _load(p)
    assert used == "timm"
    _assert_loaded(m, source)


def test_timm_bin_nested_under_model(tmp_path, source):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"model": source, "epoch": 3}, p)
    m, used = _load(p)
    assert used == "timm"
    _assert_loaded(m, source)


def test_google_npz_with_head_and_pre_logits(tmp_path, source):
    p = tmp_path / "ViT-B_16.npz"
    np.savez(p, **google_npz(source))
    m, used = _load(p)
    assert used == "npz"
    _assert_loaded(m, source)


def test_ibot_full_training_checkpoint_uses_the_teacher(tmp_path, source):
    student = _perturbed(source, 1.0)
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in source.items()},
                    "head.mlp.0.weight": torch.ones(8, D), "head.last_layer.weight_g": torch.ones(16, 1),
                    "head.last_layer2.weight_g": torch.ones(16, 1)},
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    "module.backbone.masked_embed": torch.zeros(D)},
        "ibot_loss": {"center": torch.zeros(1, 16)},
        "args": argparse.Namespace(arch="vit_base", patch_size=16, pred_ratio=0.3),
        "epoch": 100,
    }
    p = tmp_path / "checkpoint.pth"
    torch.save(ckpt, p)
    assert detect_format(p) == "ibot"
    m, used = _load(p)
    assert used == "ibot"
    _assert_loaded(m, source)


def test_ibot_released_teacher_file(tmp_path, source):
    p = tmp_path / "checkpoint_teacher.pth"
    torch.save({"state_dict": source}, p)
    m, used = _load(p, "ibot")
    assert used == "ibot"
    _assert_loaded(m, source)


def test_dino_released_and_full_checkpoints(tmp_path, source):
    flat = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(source, flat)
    m, used = _load(flat, "dino")
    assert used == "dino"
    _assert_loaded(m, source)

    full = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in source.items()}, "head.mlp.0.weight": torch.ones(8, D)},
                "student": {f"module.backbone.{k}": v for k, v in _perturbed(source, 2.0).items()},
                "dino_loss": {"center": torch.zeros(1, 16)}, "args": argparse.Namespace(arch="vit_base"), "epoch": 9}, full)
    m, used = _load(full)
    assert used == "dino"
    _assert_loaded(m, source)


def test_mocov3_uses_the_base_encoder(tmp_path, source):
    sd = {f"module.base_encoder.{k}": v for k, v in source.items()}
    sd.update({f"module.momentum_encoder.{k}": v for k, v in _perturbed(source, 3.0).items()})
    sd.update({"module.base_encoder.head.0.weight": torch.ones(32, D), "module.predictor.0.weight": torch.ones(32, 32)})
    p = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}}, p)
    m, used = _load(p)
    assert used == "mocov3"
    _assert_loaded(m, source)

    deit = tmp_path / "mocov3-vit-base-300ep.pth"  # moco-v3's convert_to_deit.py output
    torch.save({"model": source}, deit)
    m, used = _load(deit, "mocov3")
    _assert_loaded(m, source)


def test_create_backbone_records_sha256_and_format(tmp_path, source):
    p = tmp_path / "w.safetensors"
    save_file(source, str(p))
    _, info = create_backbone(BackboneConfig(name=ARCH, pretrained="file", checkpoint=str(p)))
    assert info.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert info.checkpoint_format == "timm" and info.source == "file" and info.checkpoint == str(p)


# --- incomplete or mismatched checkpoints fail, naming the keys ------------------------------

def test_missing_and_unexpected_keys_are_listed(tmp_path, source):
    sd = dict(source)
    del sd["blocks.5.mlp.fc2.weight"]
    sd["blocks.6.norm1.weight"] = torch.ones(D)
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError) as e:
        _load(p)
    msg = str(e.value)
    assert "missing keys: blocks.5.mlp.fc2.weight" in msg
    assert "unexpected keys: blocks.6.norm1.weight" in msg


def test_shape_mismatch_from_another_architecture(tmp_path):
    p = tmp_path / "patch4.safetensors"
    save_file(_model(3, "vit_micro_patch4_32").state_dict(), str(p))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*pos_embed \(1, 65, 64\) vs \(1, 17, 64\)"):
        _load(p)


def test_npz_missing_key_and_wrong_patch_size(tmp_path, source):
    arrays = google_npz(source)
    del arrays["Transformer/encoderblock_5/MlpBlock_3/Dense_1/kernel"]
    p = tmp_path / "trunc.npz"
    np.savez(p, **arrays)
    with pytest.raises(CheckpointError, match="missing keys: Transformer/encoderblock_5/MlpBlock_3/Dense_1/kernel"):
        _load(p)
    other = google_npz({k: v for k, v in _model(4, "vit_micro_patch4_32").state_dict().items()})
    q = tmp_path / "patch4.npz"
    np.savez(q, **other)
    with pytest.raises(CheckpointError, match=r"embedding/kernel \(4, 4, 3, 64\) vs \(8, 8, 3, 64\)"):
        _load(q)


def test_ssl_teacher_with_foreign_keys_is_rejected(tmp_path, source):
    p = tmp_path / "ibot.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in source.items()}, "extra.weight": torch.ones(2)}}, p)
    with pytest.raises(CheckpointError, match="outside backbone.\\* and head.\\*: extra.weight"):
        _load(p, "ibot")


def test_truncated_file_is_an_error(tmp_path, source):
    p = tmp_path / "full.pth"
    torch.save(source, p)
    data = p.read_bytes()
    q = tmp_path / "truncated.pth"
    q.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint truncated.pth"):
        _load(q)


def test_cli_bad_checkpoint_exits_2_without_a_run_dir(tmp_path, source, capsys):
    import bench

    sd = dict(source)
    del sd["norm.bias"]
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    out = tmp_path / "runs"
    code = bench.main(["run", "-b", "synthetic", "-m", "linear_probe", "--backbone", ARCH, "--checkpoint", str(p),
                       "--out", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "missing keys: norm.bias" in err and "Traceback" not in err
    assert not out.exists()


def test_unreachable_hub_is_one_sentence_without_waiting(monkeypatch):
    """timm names download from the Hugging Face hub; offline and uncached, the run stops at once
    (huggingface_hub alone would retry for over a minute). The socket is faked: no network."""
    import socket

    import methods.backbones as B
    from methods.backbones import BackboneError

    def refuse(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(B, "_cached_hub_file", lambda name: None)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(BackboneError) as e:
        build_model("vit_base_patch16_224.augreg_in21k", pretrained=True)
    msg = str(e.value)
    assert "huggingface.co is unreachable" in msg and "hf-hub:timm/vit_base_patch16_224.augreg_in21k" in msg
    assert "--checkpoint PATH" in msg and "\n" not in msg


def test_timm_name_records_the_resolved_tag_and_file_sha256(tmp_path, monkeypatch):
    """A timm name without a tag resolves to timm's default tag, and the hub file's SHA-256 goes
    into the result. No network: the weights are the (unloaded) architecture, the cached hub file
    is a stand-in written here."""
    import timm

    import methods.backbones as B

    cached = tmp_path / "model.safetensors"
    cached.write_bytes(b"stand-in for the hub file")
    monkeypatch.setattr(B, "build_model", lambda name, drop_path=0.0, pretrained=False:
                        timm.create_model(name, pretrained=False, num_classes=0))
    monkeypatch.setattr(B, "_cached_hub_file", lambda name: str(cached))
    _, info = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained="timm"))
    # timm's default tag for vit_tiny_patch16_224 is the AugReg in21k -> in1k fine-tuned one
    assert info.tag == "augreg_in21k_ft_in1k" and info.source == "timm"
    assert info.checkpoint == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert info.sha256 == hashlib.sha256(b"stand-in for the hub file").hexdigest()
    _, tagged = create_backbone(BackboneConfig(name="vit_tiny_patch16_224.augreg_in21k", pretrained="timm"))
    assert tagged.tag == "augreg_in21k" and tagged.checkpoint == "timm/vit_tiny_patch16_224.augreg_in21k"


def test_pretrained_micro_cache_is_keyed_by_the_recipe(tmp_path, monkeypatch):
    """The suite's CPU backbone is pretrained once per recipe: a second call reads the cache, a
    changed setting gets a new file name (never stale weights). The training itself is stubbed."""
    import methods.pretrain as P

    calls = []

    def fake_pretrain(arch, out_path, log=print):
        calls.append(out_path)
        save_file(_model(0).state_dict(), str(out_path))
        return {}

    monkeypatch.setenv("PROMPTCL_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "pretrain_micro", fake_pretrain)
    first = P.pretrained_micro_path(ARCH, log=lambda m: None)
    assert P.pretrained_micro_path(ARCH, log=lambda m: None) == first and calls == [first]
    expected = hashlib.sha256(json.dumps(P.recipe(), sort_keys=True).encode()).hexdigest()[:10]
    assert first.name == f"{ARCH}-synthetic-v{P.VERSION}-{expected}.safetensors"
    monkeypatch.setattr(P, "EPOCHS", P.EPOCHS + 1)
    second = P.pretrained_micro_path(ARCH, log=lambda m: None)
    assert second != first and calls == [first, second]
    _, info = create_backbone(BackboneConfig(name=ARCH, pretrained="synthetic"))
    assert info.tag == "synthetic_pretrain" and info.sha256 == hashlib.sha256(second.read_bytes()).hexdigest()


def test_pretraining_shape_classes_are_seeded_and_distinct():
    from methods.pretrain import render_shape_class

    a = render_shape_class(3, 4, 32, sample_seed=0)
    assert a.shape == (4, 3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, render_shape_class(3, 4, 32, sample_seed=0))  # seeded
    assert not np.array_equal(a, render_shape_class(3, 4, 32, sample_seed=1))  # new samples, same class
    # class means differ far more between classes than between two sample sets of one class
    m = lambda c, s: render_shape_class(c, 16, 32, s).astype(np.float32).mean(0)  # noqa: E731
    within = np.abs(m(3, 0) - m(3, 1)).mean()
    between = np.abs(m(3, 0) - m(4, 0)).mean()
    assert between > 2 * within

"""Defects 2 and 3: a corrupted checkpoint is refused by its SHA-256; a planted pickle (checkpoint or
CIFAR-100 file) runs no code, on --resume, on sweep --dry-run and when loading data."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

from tests.faults.helpers import Payload, TINY_SET, cli, one_sentence, run_args, snapshot


def test_flipped_weights_inside_the_checkpoint_are_refused(unfinished, capsys):
    out, d = unfinished
    data = bytearray((d / "checkpoint.pt").read_bytes())
    head = torch.load(d / "checkpoint.pt", weights_only=True)["state"]["head.weight"]
    raw = head.contiguous().numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0 and len(raw) >= 256  # the tensor's bytes lie in the zip uncompressed
    data[at: at + 256] = np.full(64, 3.0, np.float32).tobytes()  # 64 weights overwritten, the zip still loads
    (d / "checkpoint.pt").write_bytes(bytes(data))
    assert torch.equal(torch.load(d / "checkpoint.pt", weights_only=True)["state"]["head.weight"].flatten()[:64],
                       torch.full((64,), 3.0))
    before = snapshot(out)
    code, err, _ = cli(run_args(out, "--resume"), capsys)
    assert code == 2 and one_sentence(err), err
    assert f"{d / 'checkpoint.pt'} is damaged: its SHA-256 does not match checkpoint.pt.sha256" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("with_digest", [False, True], ids=["planted", "planted-with-matching-digest"])
def test_a_planted_checkpoint_runs_nothing_on_resume_or_sweep_dry_run(unfinished, tmp_path, capsys, with_digest):
    out, d = unfinished
    marker = tmp_path / "pwned"
    torch.save({"task": 0, "state": {}, "x": Payload(marker)}, d / "checkpoint.pt")
    if with_digest:  # a digest is no defence against someone who can write the folder: weights_only is
        h = hashlib.sha256((d / "checkpoint.pt").read_bytes()).hexdigest()
        (d / "checkpoint.pt.sha256").write_text(f"{h}  checkpoint.pt\n")
    before = snapshot(out)
    code, err, _ = cli(run_args(out, "--resume"), capsys)
    assert code == 2 and one_sentence(err), err
    assert f"{d / 'checkpoint.pt'} is unreadable (it holds objects other than tensors and plain containers)" in err
    code, err, _ = cli(["sweep", "-b", "synthetic", "-m", "linear_probe", "--out", str(out), "--device", "cpu",
                        "--dry-run", "--set", *TINY_SET], capsys)
    assert code == 2 and one_sentence(err) and "checkpoint.pt is unreadable" in err, err
    assert not marker.exists()  # the pickled call never ran
    assert snapshot(out) == before


def test_a_planted_cifar_pickle_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROMPTCL_OFFLINE", "1")
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    ok = {"fine_labels": [0, 1], "data": np.zeros((2, 3072), np.uint8)}
    (folder / "train").write_bytes(pickle.dumps(ok))
    (folder / "test").write_bytes(pickle.dumps(ok))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a", "b"], "x": Payload(marker)}))
    out = tmp_path / "runs"
    code, err, _ = cli(["run", "-b", "cifar100", "-m", "ncm", "--data-root", str(tmp_path / "data"), "--out", str(out),
                        "--device", "cpu", "--quiet", "--set", "backbone.pretrained=none"], capsys)
    assert code == 2 and one_sentence(err), err
    assert f"CIFAR-100 files under {folder} are unreadable (UnpicklingError: it names io.open, which a data file has no reason to call; refused)" in err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("killed_at", [1, 2, 3], ids=["before-file-rename", "before-digest-rename", "after"])
def test_a_kill_between_the_checkpoint_and_its_digest_never_makes_it_look_damaged(tmp_path, monkeypatch, killed_at):
    import os

    from benchmarks.run.store import RunStore

    store = RunStore(tmp_path / "run")
    store.save_checkpoint({"task": 0, "state": {"w": torch.zeros(3)}})
    real, calls = os.replace, []

    def replace(src, dst):  # the k-th rename of the next save never happens (the process is killed)
        calls.append(dst)
        if len(calls) == killed_at + 1:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        for task in (1, 2):
            store.save_checkpoint({"task": task, "state": {"w": torch.full((3,), float(task))}})
    monkeypatch.undo()
    ckpt = store.load_checkpoint()  # verified against the digest file as it was left
    expected = {1: 0, 2: 1, 3: 1}[killed_at]  # the last checkpoint whose rename happened
    assert ckpt["task"] == expected and torch.equal(ckpt["state"]["w"], torch.full((3,), float(expected)))

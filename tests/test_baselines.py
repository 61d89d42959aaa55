"""Baselines: NCM prototypes and cosine logits, linear probe head-only training, fine-tuning and
joint training on cumulative data."""
import torch
import torch.nn.functional as F

from benchmarks.run.protocol import QueryCache, RunContext, TaskContext, train_phase
from benchmarks.run.runner import prepare
from methods.base import Phase
from conftest import make_tiny_config


def _ctx(method_name, overrides=None):
    cfg = make_tiny_config(method_name, overrides)
    p = prepare(cfg)
    return p, RunContext(cfg, p.scenario, torch.device("cpu"), None, QueryCache(True))


def test_ncm_prototypes_are_class_means_of_frozen_test_transform_features():
    p, run = _ctx("ncm")
    task = p.scenario.tasks[0]
    p.method.begin_task(task)
    assert p.method.phases(task) == []
    p.method.end_task(task, TaskContext(run, task))
    ds = p.scenario.train_sets[0].with_transform(p.scenario.test_transform)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        feats = p.method.backbone.vit.forward_features(x)[:, 0]
    for c in (0, 1):
        assert torch.allclose(p.method.prototypes[c], feats[y == c].mean(0), atol=1e-5)
    assert p.method.prototypes[2:].abs().sum() == 0
    # logits are cosine similarities to the prototypes
    out = p.method(x[:3])
    ref = F.normalize(feats[:3], dim=-1) @ F.normalize(p.method.prototypes, dim=-1).T
    assert torch.allclose(out.logits, ref, atol=1e-5)


def test_linear_probe_trains_only_its_head():
    p, run = _ctx("linear_probe")
    backbone_before = {k: v.clone() for k, v in p.method.backbone.state_dict().items()}
    task = p.scenario.tasks[0]
    p.method.begin_task(task)
    train_phase(p.method, run, task, Phase("train"), 0)
    assert all(torch.equal(v, backbone_before[k]) for k, v in p.method.backbone.state_dict().items())
    assert sum(q.numel() for q in p.method.parameters() if q.requires_grad) == 64 * 6 + 6


def test_finetune_updates_the_backbone():
    p, run = _ctx("finetune")
    w0 = p.method.backbone.vit.blocks[0].attn.qkv.weight.detach().clone()
    task = p.scenario.tasks[0]
    p.method.begin_task(task)
    train_phase(p.method, run, task, Phase("train"), 0)
    assert not torch.equal(w0, p.method.backbone.vit.blocks[0].attn.qkv.weight)
    assert p.method.backbone.trainable and "backbone.vit.blocks.0.attn.qkv.weight" in p.method.checkpoint_state()


def test_joint_trains_on_all_seen_tasks_with_the_seen_mask():
    p, run = _ctx("joint", {"method": {"finetune_backbone": False}})
    seen_labels = []
    losses = []
    orig_loss = p.method.training_loss

    def loss_spy(out, y, mask):
        seen_labels.append(y.clone())
        losses.append(mask.clone())
        return orig_loss(out, y, mask)

    p.method.training_loss = loss_spy
    task = p.scenario.tasks[1]
    p.method.begin_task(task)
    train_phase(p.method, run, task, Phase("train"), 0)
    labels = torch.cat(seen_labels)
    # tasks 0 and 1: 4 classes × 12 images, each seen once in the epoch
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 3] and len(labels) == 48
    assert losses[0].tolist() == [True] * 4 + [False] * 2
    assert p.method.uses_query

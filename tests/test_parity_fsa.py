"""Parity adapters of the first-session methods (benchmarks/tools/parity_ranpac.py, ...): the pieces
that need no authors' checkout (name maps, csv arguments, the row order of the stand-in data
manager), and the defects the parity runs found, checked against the references' behaviour
written out here (torchvision's PIL transforms as their ``utils/data.py`` composes them)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as TV
from PIL import Image

from benchmarks.tools.parity import probe_image
from benchmarks.tools.parity_pilot import OneBatchData
from benchmarks.tools.parity_ranpac import adapter_names, csv_args, ssf_name


def _our_test_transform(method: str, benchmark: str, image: np.ndarray) -> torch.Tensor:
    from benchmarks.tables.cost_table import resolve_method_config
    from benchmarks.data.datasets import build_transform

    cfg, _ = resolve_method_config(method, benchmark, "paper", {})
    tf = build_transform(cfg.benchmark, 224, max(image.shape[:2]), train=False)
    return tf(torch.from_numpy(image).permute(2, 0, 1).contiguous())


def test_ranpac_cifar_test_transform_is_their_bicubic_resize():
    # RanPAC utils/data.py build_transform(False, None, isCifar=True):
    # Resize(224, BICUBIC), CenterCrop(224), ToTensor() on the PIL image (no normalisation)
    img = probe_image("cifar100", 0)
    theirs = TV.Compose([TV.Resize(224, interpolation=TV.InterpolationMode.BICUBIC), TV.CenterCrop(224),
                         TV.ToTensor()])(Image.fromarray(img))
    ours = _our_test_transform("ranpac", "cifar100", img)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert float((ours - theirs).abs().max()) <= 3 / 255
    # the check has teeth: the bilinear resize the preset had is far outside the tolerance
    bilinear = TV.Compose([TV.Resize(224), TV.ToTensor()])(Image.fromarray(img))
    assert float((bilinear - theirs).abs().max()) > 10 / 255


def test_adapter_and_ssf_names_map_to_ours():
    assert adapter_names("blocks.3.adaptmlp.down_proj.weight") == "peft.adapters.3.down.weight"
    assert adapter_names("blocks.11.adaptmlp.up_proj.bias") == "peft.adapters.11.up.bias"
    assert adapter_names("blocks.3.attn.qkv.weight") is None
    # petl/vision_transformer_ssf.py: ssf_*_1 / _2 of a block are after norm1 / norm2, of attn
    # after qkv / proj, of mlp after fc1 / fc2; patch_embed's after the projection; the model's
    # own after the final norm
    expected = {
        "patch_embed.ssf_scale_1": "peft.ssf.patch.scale",
        "ssf_shift_1": "peft.ssf.norm.shift",
        "blocks.0.ssf_scale_1": "peft.ssf.b0_norm1.scale",
        "blocks.0.ssf_shift_2": "peft.ssf.b0_norm2.shift",
        "blocks.7.attn.ssf_scale_1": "peft.ssf.b7_qkv.scale",
        "blocks.7.attn.ssf_shift_2": "peft.ssf.b7_proj.shift",
        "blocks.2.mlp.ssf_scale_1": "peft.ssf.b2_fc1.scale",
        "blocks.2.mlp.ssf_shift_2": "peft.ssf.b2_fc2.shift",
    }
    for theirs, ours in expected.items():
        assert ssf_name(theirs) == ours, theirs


def test_csv_args_parse_like_pandas(tmp_path):
    p = tmp_path / "x_publish.csv"
    p.write_text("ID,dataset,shuffle,init_cls,model_name,seed,body_lr,use_RP,M\n"
                 "6,cifar224,True,10,adapter,1993,0.01,True,0\n7,cifar224,True,10,adapter,1993,0.01,True,10000\n")
    a = csv_args(str(p), 7)
    assert a["M"] == 10000 and isinstance(a["M"], int)
    assert a["body_lr"] == 0.01 and a["use_RP"] is True and a["shuffle"] is True
    assert a["model_name"] == "adapter" and a["device"] == ["cpu"] and a["seed"] == [1993]


def test_stand_in_loader_uses_the_order_our_end_task_reads():
    # our end_task shuffles with ctx.generator(...); in the harness that is BatchContext's, seeded 0
    from benchmarks.tools.parity import BatchContext

    x, y = torch.arange(7.0).view(7, 1), torch.arange(7)
    data = OneBatchData(10, [5, 5])
    data.batch = (x, y)
    [(idx, xs, ys)] = data.loader()
    ctx = BatchContext.__new__(BatchContext)
    perm = torch.randperm(7, generator=ctx.generator("ranpac-order", 0))
    assert torch.equal(idx, perm) and torch.equal(ys, y[perm]) and torch.equal(xs[:, 0], x[perm, 0])


def _our_train_transform(method: str, benchmark: str, image: np.ndarray, seed: int) -> torch.Tensor:
    from benchmarks.tables.cost_table import resolve_method_config
    from benchmarks.data.datasets import build_transform

    cfg, _ = resolve_method_config(method, benchmark, "paper", {})
    tf = build_transform(cfg.benchmark, 224, max(image.shape[:2]), train=True)
    torch.manual_seed(seed)
    return tf(torch.from_numpy(image).permute(2, 0, 1).contiguous())


def _unnormalise(t: torch.Tensor) -> torch.Tensor:  # the ImageNet mean/std both sides use
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return t * std + mean


def test_slca_imagenet_r_and_cub_train_transforms_are_their_bicubic_ones():
    # SLCA utils/data.py: iImageNetR RandomResizedCrop(224, interpolation=3) + flip; iCUB200_224
    # Resize((300, 300), interpolation=3) + RandomCrop((224, 224)) + flip; then ToTensor and the
    # ImageNet Normalize; the same RNG state on both sides picks the same crop and flip
    img = probe_image("imagenet_r", 0)
    theirs = {
        "imagenet_r": TV.Compose([TV.RandomResizedCrop(224, interpolation=TV.InterpolationMode.BICUBIC),
                                  TV.RandomHorizontalFlip(), TV.ToTensor()]),
        "cub200": TV.Compose([TV.Resize((300, 300), interpolation=TV.InterpolationMode.BICUBIC),
                              TV.RandomCrop((224, 224)), TV.RandomHorizontalFlip(), TV.ToTensor()]),
    }
    for bench, tf in theirs.items():
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            ref = tf(Image.fromarray(img))
            ours = _unnormalise(_our_train_transform("slca", bench, img, seed))
            assert ours.shape == ref.shape == (3, 224, 224), bench
            assert float((ours - ref).abs().max()) <= 3 / 255, (bench, seed)


def test_first_session_side_compares_task_0_training_and_the_readout_after_it():
    """Our side of the RanPAC / APER adapters on a micro ViT: the step, schedule and loader are
    phase 1's (task 0), the step's labels are the task-1 batch's moved to task 0's classes, and
    the boundary reports nothing trained in task 1 plus the readout rows of task 0's classes."""
    import math

    from benchmarks.tables.cost_table import resolve_method_config
    from benchmarks.tools.parity import batch_for
    from benchmarks.tools.parity_ranpac import FirstSessionSide
    from methods.backbones import build_model

    torch.manual_seed(0)
    cfg, _ = resolve_method_config("ranpac", "synthetic", "paper", {"method": {"M": 40, "bottleneck": 8, "gram_dtype": "float64"}})
    side = FirstSessionSide("ranpac", cfg, build_model("vit_micro_patch8_32"), 0)
    side.extra_tensors, side.buffers, side.class_rows = ["w_rand"], ["G", "Q", "Wo"], ("Wo",)
    t0, t1 = side.tasks[0], side.tasks[1]
    assert set(side.init) == {n for n in side.tensors() if n != "w_rand"} and "fs_head.weight" in side.init
    # the reference's CosineAnnealingLR(T_max=tuned_epoch, eta_min=0), stepped once per epoch
    E, lr = cfg.train.epochs, cfg.train.lr
    want = torch.tensor([lr * 0.5 * (1 + math.cos(math.pi * e / E)) for e in range(E)], dtype=torch.float64)
    lrs = side.lrs(3)
    assert set(lrs) == set(side.init)
    for v in lrs.values():
        assert torch.allclose(v, want, rtol=1e-12, atol=1e-15)
    assert side.steps_per_epoch(5003) == math.ceil(5003 / cfg.train.batch_size)  # no drop_last
    prev = batch_for(side.num_classes, cfg.benchmark.num_tasks, 0, 4, 0, side.image_size)
    side.start_task(0)
    side.start_task(1, prev)
    st = side.boundary_state()
    assert all(float(v) == 0.0 for k, v in st.items() if k.startswith("trained:"))
    assert st["buffer:Wo"].shape == (t0.class_end, 40) and st["buffer:G"].shape == (40, 40)
    x, y = batch_for(side.num_classes, cfg.benchmark.num_tasks, 1, 4, 0, side.image_size)
    step = side.train_step(x, y)
    assert step.logits.shape == (4, t0.class_end - t0.class_start)
    y0 = y - t1.class_start + t0.class_start
    assert torch.allclose(step.losses["ce"], F.cross_entropy(step.logits, y0), atol=1e-6)
    assert set(step.grads) == set(side.init)  # phase 1 trains the module and the head

"""The calls timm's own scripts make, against a checkpoint written by `t2t-vit train`.

timm's validate.py and train.py are not in its wheel, so this file makes their calls: the model
(``create_model(..., pretrained_cfg_overlay=dict(file=))``, ``checkpoint_path=``, ``local-dir:``,
``load_checkpoint(use_ema=...)`` on the ``.pth.tar`` the trainer writes), the preprocessing
(``resolve_data_config`` + ``create_transform``), the data (``create_dataset`` +
``create_loader``) and the paper's RandAugment; every path must give `t2t-vit eval`'s top-1.
The real scripts, run from a timm checkout, are in docs/checkpoints.md.
"""
from __future__ import annotations

import random

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_loader, create_transform, resolve_data_config
from timm.models import load_checkpoint

import t2t_vit
from helpers import ARCH, MEAN


def timm_top1(model: torch.nn.Module, data) -> float:
    """top-1 the way timm's validate.py gets it: its data config, dataset and loader."""
    config = resolve_data_config({}, model=model)
    dataset = create_dataset("", root=str(data), split="validation")
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=64, use_prefetcher=False,
                           interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
                           crop_pct=config["crop_pct"], crop_mode=config["crop_mode"], num_workers=0)
    model.eval()
    hits = count = 0
    with torch.no_grad():
        for images, target in loader:
            hits += (model(images).argmax(-1) == target).sum().item()
            count += target.numel()
    return round(100.0 * hits / count, 2)


def test_every_timm_path_gives_the_top1_of_t2t_vit_eval(trained, digits_folder, tmp_path):
    run, top1 = trained
    best = run / "checkpoint-best.safetensors"
    assert top1 > 20  # a model that learnt something, so a dropped head or a wrong crop shows
    meta = t2t_vit.read_metadata(best)
    as_file = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(best)))
    assert as_file.num_classes == 10 and as_file.img_size == (32, 32)  # the file's head and size, not 1000/224
    config = resolve_data_config({}, model=as_file)
    assert (config["input_size"], config["crop_pct"], config["mean"]) == ((3, 32, 32), 1.0, MEAN)
    assert timm_top1(as_file, digits_folder) == top1
    # timm's create_model(checkpoint_path=) path, through ours
    assert timm_top1(t2t_vit.create_model("t2t_vit_7", checkpoint_path=str(best)), digits_folder) == top1
    # local-dir: from a save_pretrained folder of the model the checkpoint describes
    t2t_vit.save_pretrained(t2t_vit.model_from_checkpoint(best), tmp_path / "hf")
    local = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True)
    assert timm_top1(local, digits_folder) == top1
    # validate.py --checkpoint [--use-ema]: timm's load_checkpoint on the .pth.tar beside it
    for use_ema in (True, False):
        flags = {k: as_file.pretrained_cfg[k] for k in ("mean", "std", "crop_pct")}  # validate.py's flags
        model = timm.create_model("t2t_vit_7", num_classes=10, img_size=32, stem="small", **ARCH,
                                  pretrained_cfg_overlay=flags)
        load_checkpoint(model, str(run / "checkpoint-best.pth.tar"), use_ema=use_ema)
        reference = t2t_vit.model_from_checkpoint(best, use_ema=use_ema)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
        if (meta["preferred"] == "ema") == use_ema:
            assert timm_top1(model, digits_folder) == top1


def test_head_that_fits_is_loaded_not_dropped(trained, caplog):
    """timm used to drop a trained head on a class-count `change` from its cfg's 1000 (chance accuracy)."""
    run, _ = trained
    best = run / "checkpoint-best.safetensors"
    model = timm.create_model("t2t_vit_7", pretrained=True, num_classes=10, img_size=32, stem="small", **ARCH,
                              pretrained_cfg_overlay=dict(file=str(best))).eval()  # all given: only the head differs
    reference = t2t_vit.model_from_checkpoint(best).eval()
    assert torch.equal(model.head.weight, reference.head.weight)
    assert "Missing keys" not in caplog.text
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_timm_load_checkpoint_reads_the_training_checkpoint(trained):
    run, _ = trained
    for name in ("checkpoint-best", "checkpoint-last"):
        model = timm.create_model("t2t_vit_7", num_classes=10, img_size=32, stem="small", **ARCH)
        for use_ema in (True, False):  # strict load: no "Unexpected key(s) ema.*"
            load_checkpoint(model, str(run / f"{name}.pth.tar"), use_ema=use_ema)
            own = t2t_vit.read_state_dict(run / f"{name}.safetensors", use_ema=use_ema)
            assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())
    # train.py --initial-checkpoint: timm's create_model(checkpoint_path=), its load_checkpoint (EMA first)
    initial = timm.create_model("t2t_vit_7", num_classes=10, img_size=32, stem="small", **ARCH,
                                checkpoint_path=str(run / "checkpoint-best.pth.tar"))
    ema = t2t_vit.read_state_dict(run / "checkpoint-best.safetensors", use_ema=True)
    assert all(torch.equal(initial.state_dict()[k], v) for k, v in ema.items())


def test_timm_randaugment_runs_unpatched_at_every_magnitude():
    """The paper's rand-m9-mstd0.5-inc1 through timm's public create_transform, no wrapper of ours:
    posterize asks Pillow for 0 bits at magnitude 10, which the Pillow we pinned before refused."""
    transform = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")
    augment = next(t for t in transform.transforms if type(t).__name__ == "RandAugment")
    assert any(op.aug_fn is timm.data.auto_augment.posterize for op in augment.ops)  # timm's own op
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    posterize = next(op for op in augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0  # 0 bits, every call
    assert np.asarray(posterize(image)).max() == 0  # all bits dropped: black, no exception
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 0.5, 9, 0.5
    random.seed(0)
    for _ in range(3000):  # the draws that reached 0 bits crashed ~4 per 3,000 calls before
        assert transform(image).shape == (3, 32, 32)

"""Hugging Face-style folders round-trip everything a training checkpoint knows.

``save_pretrained(model_from_checkpoint(CK), DIR)`` keeps the checkpoint's preprocessing, class
names and training data (``tag``) for ``local-dir:`` and ``from_pretrained``; a folder written by
timm's ``save_for_hf`` (``pytorch_model.bin`` by default, or safetensors) loads through both and
gives the same model as ours.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import save_for_hf

import t2t_vit
from t2t_vit.errors import T2TViTError
from helpers import MEAN, STD

DATA_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


def _data(model) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in resolve_data_config({}, model=model).items()}


def _same(a, b) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    assert _data(a) == _data(b)


def test_save_pretrained_keeps_the_checkpoints_preprocessing_names_and_source(trained, digits_folder, tmp_path):
    run, _ = trained
    source = t2t_vit.model_from_checkpoint(run / "checkpoint-best.safetensors")
    t2t_vit.save_pretrained(source, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["label_names"] == [str(i) for i in range(10)]
    assert config["pretrained_cfg"]["tag"] == digits_folder.name  # the training folder, not "in1k"
    for model in (timm.create_model(f"local-dir:{tmp_path / 'ours'}", pretrained=True),
                  t2t_vit.from_pretrained(tmp_path / "ours")):
        data = _data(model)
        assert (data["input_size"], data["mean"], data["std"], data["crop_pct"], data["interpolation"]) == \
            ((3, 32, 32), MEAN, STD, 1.0, "bicubic")
        assert list(model.pretrained_cfg["label_names"]) == config["label_names"]
        assert model.pretrained_cfg["tag"] == digits_folder.name
        _same(model, source)
    # the folder as checkpoint_path=: its arguments are defaults, the ones given win
    bigger = t2t_vit.create_model("t2t_vit_7", checkpoint_path=tmp_path / "ours", img_size=48, num_classes=10)
    assert bigger.img_size == (48, 48) and _data(bigger)["input_size"] == (3, 48, 48)
    assert torch.equal(bigger.head.weight, source.head.weight)


@pytest.mark.parametrize("serialization", [False, True], ids=["pytorch_model.bin", "model.safetensors"])
def test_timm_save_for_hf_folder_loads_like_ours(trained, tmp_path, serialization):
    run, _ = trained
    source = t2t_vit.model_from_checkpoint(run / "checkpoint-best.safetensors")
    save_for_hf(source, str(tmp_path / "timm"), safe_serialization=serialization)
    t2t_vit.save_pretrained(source, tmp_path / "ours")
    ours = t2t_vit.from_pretrained(tmp_path / "ours")
    for model in (timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True),
                  t2t_vit.from_pretrained(tmp_path / "timm")):
        _same(model, ours)


def test_folder_without_weights_names_both_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "t2t_vit_7"}))
    with pytest.raises(T2TViTError, match="model.safetensors or pytorch_model.bin"):
        t2t_vit.from_pretrained(tmp_path)

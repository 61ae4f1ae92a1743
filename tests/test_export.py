"""export: ONNX (onnxruntime) and TorchScript parity with PyTorch, dynamic batch; torch.hub entry points."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import t2t_vit
from t2t_vit import export

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def small(name: str, **kwargs):
    torch.manual_seed(0)
    return t2t_vit.create_model(name, num_classes=7, img_size=32, stem="small", **kwargs).eval()


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])  # Performer and Transformer T2T layers
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity_dynamic_batch(name, fmt, tmp_path):
    model = small(name)
    path = export.export_model(model, fmt, tmp_path / f"model.{fmt}")  # exported at batch 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    got = export.run_exported(path, fmt, x)
    assert got.shape == (3, 7)
    assert abs(got - expected).max() < 1e-4


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["t2t_vit_16_ghost", "t2t_vit_dense", "t2t_vit_c_14", "vit_s16_se"])
def test_other_designs_export_to_onnx(name, tmp_path):
    """The block and tokenizer kinds not covered above (depth cut where the variant allows)."""
    cut = dict(dense_stages=(1, 1), growth=16) if "dense" in name else dict(depth=2)
    model = small(name, **cut)
    path = export.export_onnx(model, tmp_path / "m.onnx")
    assert export.check_export(model, path, "onnx", batch=2) < 1e-4


def test_cli_torchscript(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    export.register(parser.add_subparsers())
    out = tmp_path / "m.pt"
    args = parser.parse_args(["export", "--model", "t2t_vit_7", "--img-size", "32", "--stem", "small",
                              "--format", "torchscript", "--output", str(out)])
    assert args.func(args) == 0 and out.is_file()
    assert "checked: batch 3" in capsys.readouterr().out


def test_torch_hub_local():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # The rule torch.hub.list applies: public callables of hubconf.
    entries = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]
    assert sorted(entries) == sorted(t2t_vit.list_models()) and hubconf.dependencies == ["torch", "timm"]
    model = torch.hub.load(str(REPO), "t2t_vit_14", source="local", num_classes=4, img_size=32, stem="small")
    assert isinstance(model, t2t_vit.T2TViT) and model.embed_dim == 384 and len(model.blocks) == 14
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)

"""export: ONNX (onnxruntime) and TorchScript parity with PyTorch, dynamic batch; torch.hub entry points."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

import t2t_vit
from t2t_vit import export
from t2t_vit.errors import MissingDependency

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


SMALL = ["--model", "t2t_vit_7", "--img-size", "32", "--stem", "small"]


def cli(capsys, *argv):
    from t2t_vit.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_onnxscript_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    out = tmp_path / "m.onnx"
    code, _, err = cli(capsys, "export", *SMALL, "--format", "onnx", "--output", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "onnxscript" in err and "pip install 't2t-vit[export]'" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_for_the_check_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependency, match=r"onnxruntime.*t2t-vit\[export\]"):
        export.run_exported(tmp_path / "m.onnx", "onnx", torch.zeros(1, 3, 32, 32))


def test_debug_shows_the_cause_of_a_missing_extra(tmp_path, monkeypatch):
    from t2t_vit.cli import main

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(MissingDependency) as raised:
        main(["--debug", "export", *SMALL, "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    assert isinstance(raised.value.__cause__, ImportError)
    text = "".join(traceback.format_exception(raised.value))
    assert "direct cause of the following exception" in text and "import of onnxscript halted" in text


def test_export_into_a_file_path_that_cannot_be_a_folder(tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    code, _, err = cli(capsys, "export", *SMALL, "--format", "torchscript", "--output", str(blocker / "m.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot write" in err
    assert blocker.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_into_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = cli(capsys, "export", *SMALL, "--format", "torchscript", "--output", str(folder / "m.pt"))
    finally:
        folder.chmod(0o755)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot write" in err
    assert list(folder.iterdir()) == []


def test_read_only_file_system_is_one_line_and_nothing_written(tmp_path, capsys, monkeypatch):
    """What a read-only mount answers (EROFS) when the temporary file is created."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, _, err = cli(capsys, "export", *SMALL, "--format", "torchscript", "--output", str(tmp_path / "m.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Read-only file system" in err
    assert list(tmp_path.iterdir()) == []


def test_failed_export_or_check_leaves_the_old_file_and_no_temporary(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"previous export")

    def half_then_crash(model, path, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(export.EXPORTERS, "torchscript", half_then_crash)
    code, _, err = cli(capsys, "export", *SMALL, "--format", "torchscript", "--output", str(out))
    assert code == 2 and "No space left" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous export" and sorted(tmp_path.iterdir()) == [out]
    monkeypatch.undo()
    # A file that fails its check is not put in place either.
    code, _, err = cli(capsys, "export", *SMALL, "--format", "torchscript", "--output", str(out), "--tolerance", "-1")
    assert code == 2 and "nothing was written" in err
    assert out.read_bytes() == b"previous export" and sorted(tmp_path.iterdir()) == [out]


def _tiny_performer_normaliser(model):
    """Scale the Performer layers' q/k so φ(q)·Σφ(k) underflows: the state a trained model's
    T2T layers reach on real images, where only the `+ ε` of the normaliser keeps 0/0 away."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, t2t_vit.t2t_layers.TokenPerformer):
                module.kqv.weight.mul_(5)
    return model


@pytest.mark.e2e
def test_onnx_keeps_the_performer_epsilon(tmp_path):
    model = _tiny_performer_normaliser(small("t2t_vit_7"))
    x = export.example_input(model, 3, seed=1)
    with torch.no_grad():
        expected = model(x).numpy()
    assert torch.isfinite(torch.from_numpy(expected)).all()  # PyTorch's own answer is finite
    got = export.run_exported(export.export_onnx(model, tmp_path / "m.onnx"), "onnx", x)
    assert abs(got - expected).max() < 1e-4  # NaN fails this too

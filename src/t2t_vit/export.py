"""Ship a model: `t2t-vit export --format onnx|torchscript` with a dynamic batch axis.

ONNX goes through torch's ``torch.export``-based exporter (the default since PyTorch 2.9) with
the batch dimension declared dynamic; TorchScript through tracing (the batch size is read from
the input at run time, so a module traced at batch 1 runs any batch). The spatial size is fixed
at export time, as the position table is. After writing, the file is run on a random batch and
compared with PyTorch (onnxruntime for ONNX).
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError
from t2t_vit.predict import load_model

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def example_input(model: nn.Module, batch: int = 1, seed: int = 0) -> Tensor:
    """A random (batch, C, H, W) input of the model's size."""
    gen = torch.Generator().manual_seed(seed)
    in_chans = getattr(model, "in_chans", 3)
    return torch.randn(batch, in_chans, *model.img_size, generator=gen).to(next(model.parameters()).device)


def export_onnx(model: nn.Module, output: str | Path, opset: int | None = None) -> Path:
    """Write ``model`` (eval mode) as one self-contained ONNX file with a dynamic batch axis."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes about specialised shapes
        torch.onnx.export(
            model.eval(), (example_input(model),), str(output), dynamo=True, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
            opset_version=opset, verbose=False,
        )
    return output


def export_torchscript(model: nn.Module, output: str | Path) -> Path:
    """Trace ``model`` (eval mode) at batch 1 and save it; it accepts any batch size."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing warns that the token grid becomes a constant: intended, the input size is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still what the task asks for
        traced = torch.jit.trace(model.eval(), example_input(model), check_trace=False)
    traced.save(str(output))
    return output


def export_model(model: nn.Module, fmt: str, output: str | Path, opset: int | None = None) -> Path:
    """Export in ``fmt`` ("onnx" or "torchscript")."""
    if fmt == "onnx":
        return export_onnx(model, output, opset)
    if fmt == "torchscript":
        return export_torchscript(model, output)
    raise T2TViTError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def run_exported(path: str | Path, fmt: str, x: Tensor) -> np.ndarray:
    """Run an exported file on ``x`` (onnxruntime on the CPU for ONNX)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise T2TViTError("checking an ONNX file needs onnxruntime: pip install 't2t-vit[export]'") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=x.device)
    with torch.no_grad():
        return module(x).cpu().numpy()


def check_export(model: nn.Module, path: str | Path, fmt: str, batch: int = 2) -> float:
    """Max |exported − PyTorch| on a random batch (a size other than the export batch)."""
    x = example_input(model, batch, seed=1)
    with torch.no_grad():
        expected = model.eval()(x).cpu().numpy()
    got = run_exported(path, fmt, x)
    if got.shape != expected.shape:
        raise T2TViTError(f"exported model returned shape {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def run(args: argparse.Namespace) -> int:
    model, _ = load_model(args.model, args.checkpoint, args.img_size, "cpu", stem=args.stem)
    path = export_model(model, args.format, args.output, args.opset)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({args.format}, {size_mb:.1f} MB, input {INPUT_NAME} (batch, 3, {model.img_size[0]}, "
          f"{model.img_size[1]}) with dynamic batch)")
    if not args.no_check:
        diff = check_export(model, path, args.format, batch=args.check_batch)
        print(f"checked: batch {args.check_batch}, max |{args.format} - pytorch| = {diff:.2e}")
        if diff > args.tolerance:
            raise T2TViTError(f"exported outputs differ from PyTorch by {diff:.2e} (> {args.tolerance:g})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX or TorchScript (dynamic batch)")
    p.add_argument("--model", help="model name (optional when the checkpoint's metadata names it)")
    p.add_argument("--checkpoint", help="weights (default: random initialisation)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write (.onnx or .pt)")
    p.add_argument("--img-size", type=int, help="fixed input size (default: the checkpoint's, else 224)")
    p.add_argument("--stem", help="soft-split stem, e.g. 'small' (default: the checkpoint's)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip running the file against PyTorch")
    p.add_argument("--check-batch", type=int, default=3, help="batch size of the check (default 3)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed difference (default 1e-4)")
    p.set_defaults(func=run)

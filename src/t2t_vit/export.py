"""Ship a model: `t2t-vit export --format onnx|torchscript` with a dynamic batch axis.

ONNX goes through torch's ``torch.export``-based exporter (the default since PyTorch 2.9) with
the batch dimension declared dynamic; TorchScript through tracing (the batch size is read from
the input at run time, so a module traced at batch 1 runs any batch). The spatial size is fixed
at export time, as the position table is. After writing, the file is run on a random batch and
compared with PyTorch (onnxruntime for ONNX) before it is renamed into place, so the output
path holds a checked file or nothing new. The exporters need the ``export`` extra.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from t2t_vit.cli_args import add_model_args, load_inference
from t2t_vit.deploy.graph import INPUT_NAME, MAX_BATCH, OUTPUT_NAME, example_input, export_onnx  # noqa: F401 (re-exported)
from t2t_vit.errors import T2TViTError, check_range, require

FORMATS = ("onnx", "torchscript", "openvino")


def export_torchscript(model: nn.Module, output: str | Path) -> Path:
    """Trace ``model`` (eval mode) at batch 1 and save it; it accepts any batch size."""
    output = Path(output)
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing warns that the token grid becomes a constant: intended, the input size is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; tracing still works
        traced = torch.jit.trace(model.eval(), example_input(model), check_trace=False)
    traced.save(str(output))
    return output


@contextlib.contextmanager
def staged(output: str | Path) -> Iterator[Path]:
    """A temporary file beside ``output`` that replaces it only when the block succeeds.

    Readers see no file or the whole new one: on any failure (read-only folder, disk full, an
    exporter error, a failed check) the temporary file is removed and ``output`` is untouched.
    An ``output`` that is a symlink keeps its link: the file it points to is replaced. The file
    gets the usual mode (0666 less the umask), not a private temporary file's 0600.
    """
    output = Path(os.path.realpath(output)) if os.path.islink(output) else Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=output.suffix or ".tmp", dir=output.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from a shared reader
    except OSError as err:
        raise T2TViTError(f"cannot write {output}: {err.strerror or err}") from err
    try:
        yield tmp
        os.replace(tmp, output)
    except OSError as err:
        raise T2TViTError(f"cannot write {output}: {err.strerror or err}; nothing was written") from err
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


EXPORTERS: dict[str, Callable[..., Path]] = {"onnx": export_onnx, "torchscript": export_torchscript}


def _exporter(fmt: str) -> Callable[..., Path]:
    if fmt not in EXPORTERS:
        raise T2TViTError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return EXPORTERS[fmt]


def export_model(model: nn.Module, fmt: str, output: str | Path, opset: int | None = None) -> Path:
    """Export in ``fmt`` ("onnx" or "torchscript") to ``output``, atomically, without a check."""
    export = _exporter(fmt)
    with staged(output) as tmp:
        export(model, tmp, **({"opset": opset} if fmt == "onnx" else {}))
    return Path(output)


def export_checked(model: nn.Module, fmt: str, output: str | Path, opset: int | None = None, batch: int = 3,
                   tolerance: float = 1e-4) -> tuple[Path, float]:
    """Export, run the file on a random batch against PyTorch (:func:`check_export`), and only
    then put it at ``output``; a difference above ``tolerance`` raises and writes nothing.
    Returns the path and the difference."""
    export = _exporter(fmt)
    with staged(output) as tmp:
        export(model, tmp, **({"opset": opset} if fmt == "onnx" else {}))
        diff = check_export(model, tmp, fmt, batch=batch)
        if not diff <= tolerance:  # a NaN difference fails too
            raise T2TViTError(f"exported outputs differ from PyTorch by {diff:.2e} (> {tolerance:g}); "
                              f"nothing was written")
    return Path(output), diff


# ---- OpenVINO IR: two files (NAME.xml and its weights NAME.bin) --------------------------------
def export_openvino(model: nn.Module, output: str | Path, check: bool = True, batch: int = 3,
                    tolerance: float = 1e-4) -> tuple[Path, float | None]:
    """Write the OpenVINO IR of ``model`` as ``output`` (.xml) and its .bin; with ``check`` the IR
    is first run (fp32) on a random batch against PyTorch. Both files are written under temporary
    names and renamed into place (weights first) only once the check passed."""
    from t2t_vit.deploy import openvino

    output = Path(output)
    if output.suffix != ".xml":
        raise T2TViTError(f"an OpenVINO IR is NAME.xml with its weights in NAME.bin; give --output {output.stem}.xml")
    graph = openvino.convert(model)
    diff = None
    with staged(output) as xml, staged(output.with_suffix(".bin")) as weights:
        with tempfile.TemporaryDirectory(prefix=f".{output.stem}.", dir=output.parent) as folder:
            written = openvino.save(graph, Path(folder) / "model.xml")
            if check:
                diff = check_export(model, written, "openvino", batch=batch)
                if not diff <= tolerance:
                    raise T2TViTError(f"exported outputs differ from PyTorch by {diff:.2e} (> {tolerance:g}); "
                                      f"nothing was written")
            os.replace(written.with_suffix(".bin"), weights)
            os.replace(written, xml)
    return output, diff


def run_exported(path: str | Path, fmt: str, x: Tensor) -> np.ndarray:
    """Run an exported file on ``x`` (onnxruntime on the CPU for ONNX, OpenVINO fp32 for IR)."""
    if fmt == "openvino":
        from t2t_vit.deploy import openvino

        return openvino.compile_graph(openvino.read(path), "fp32")(x.cpu().numpy())
    if fmt == "onnx":
        ort = require("onnxruntime", "export", "checking an ONNX file")
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
    if not args.no_check:
        check_range("--check-batch", args.check_batch, 1, MAX_BATCH)  # the dynamic axis's maximum
    model = load_inference(args, device="cpu").model
    if args.format == "openvino":
        path, diff = export_openvino(model, args.output, not args.no_check, args.check_batch, args.tolerance)
    elif args.no_check:
        path, diff = export_model(model, args.format, args.output, args.opset), None
    else:
        path, diff = export_checked(model, args.format, args.output, args.opset, args.check_batch, args.tolerance)
    files = [path, path.with_suffix(".bin")] if args.format == "openvino" else [path]  # an IR is two files
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"wrote {path} ({args.format}, {size_mb:.1f} MB, input {INPUT_NAME} (batch, 3, {model.img_size[0]}, "
          f"{model.img_size[1]}) with dynamic batch)")
    if diff is not None:
        print(f"checked: batch {args.check_batch}, max |{args.format} - pytorch| = {diff:.2e}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX, TorchScript or OpenVINO IR (dynamic batch)")
    add_model_args(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write (.onnx, .pt, or .xml with its .bin beside it); replaced only once checked")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip running the file against PyTorch")
    p.add_argument("--check-batch", type=int, default=3, help="batch size of the check (default 3)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed difference (default 1e-4)")
    p.set_defaults(func=run)

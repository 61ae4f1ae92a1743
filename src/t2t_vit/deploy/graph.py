"""What every runtime sees of a model: input/output names, an example input, the ONNX graph.

The graph is the model's own forward traced by ``torch.export`` (the exporter the ONNX and
OpenVINO paths share the input names and the dynamic batch axis of); the spatial size is fixed
when the graph is made, as the position table is.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from t2t_vit.errors import require

INPUT_NAME, OUTPUT_NAME = "image", "logits"
MAX_BATCH = 4096


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes: its ``img_size`` (ours), its patch embedding's (timm's ViTs), else
    its pretrained config's input size (timm's CNNs)."""
    size = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[1:]
    return getattr(model, "in_chans", 3), *tuple(size)


def example_input(model: nn.Module, batch: int = 1, seed: int = 0) -> Tensor:
    """A random (batch, C, H, W) input of the model's size."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape(model), generator=gen).to(next(model.parameters()).device)


def export_onnx(model: nn.Module, output: str | Path, opset: int | None = None) -> Path:
    """Write ``model`` (eval mode) as one self-contained ONNX file with a dynamic batch axis."""
    require("onnx", "export", "ONNX export")
    require("onnxscript", "export", "ONNX export")  # torch's torch.export-based exporter translates with it
    output = Path(output)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes about specialised shapes
        torch.onnx.export(
            model.eval(), (example_input(model),), str(output), dynamo=True, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
            opset_version=opset, verbose=False,
            # onnxscript's optimizer (the exporter's default) removes `x + c` for any constant c
            # within math.isclose(c, 0, abs_tol=1e-8): the Performer's `+ 1e-8` goes, and a trained
            # model whose normaliser underflows gives NaN logits. onnxruntime folds the graph itself.
            optimize=False,
        )
    return output

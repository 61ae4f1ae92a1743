"""Runtimes other than eager PyTorch: OpenVINO and ONNX Runtime, fp32, bf16 and int8.

:func:`on_runtime` turns a built model into a module that runs its forward on another runtime,
with the same input (a float32 (B, C, H, W) batch, preprocessed as for PyTorch) and the same
output (fp32 logits); ``t2t_vit.inference``, ``t2t-vit eval`` and ``t2t-vit bench`` use it, so
the preprocessing, batching and outputs are shared by every runtime. Both runtimes run on the CPU.

    from t2t_vit import deploy
    fast = deploy.on_runtime(model, "openvino", "bf16")
    logits = fast(images)          # torch in, torch out
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError

RUNTIMES = ("torch", "openvino", "onnxruntime")
PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "openvino": ("fp32", "bf16"), "onnxruntime": ("fp32",)}
# Regular expressions of the nodes int8 leaves float: the T2T module. Its Performer features (exp of
# projections, a normaliser summed over every token) and its narrow many-token layers lose agreement
# when quantized, and it holds a small share of the MACs (figures: docs/deploy.md, "Agreement with fp32").
KEEP_FLOAT: tuple[str, ...] = (".*tokens_to_token.*",)


def check(runtime: str, precision: str = "fp32", int8: bool = False) -> None:
    """One sentence when ``runtime`` cannot run ``precision`` (or int8)."""
    if runtime not in RUNTIMES:
        raise T2TViTError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS[runtime]:
        raise T2TViTError(f"runtime {runtime} runs precision {' or '.join(PRECISIONS[runtime])}, not {precision}")
    if int8 and runtime == "torch":
        raise T2TViTError("int8 runs on --runtime openvino or onnxruntime")


def compile_runtime(model: nn.Module, runtime: str, precision: str = "fp32", int8: bool = False,
                    calibration: Sequence[np.ndarray] = (), threads: int | None = None,
                    keep_float: Sequence[str] = KEEP_FLOAT) -> Callable[[np.ndarray], np.ndarray]:
    """``model`` (on the CPU) compiled for ``runtime``: a function from float32 batches to logits.

    ``int8`` quantizes after training on ``calibration`` (preprocessed float32 batches); the
    float parts run in ``precision``.
    """
    check(runtime, precision, int8)
    model = model.float().eval().cpu()
    if runtime == "openvino":
        from t2t_vit.deploy import openvino

        graph = openvino.convert(model)
        if int8:
            graph = openvino.quantize(graph, calibration, keep_float)
        return openvino.compile_graph(graph, precision, threads)
    if runtime == "onnxruntime":
        from t2t_vit.deploy import onnxruntime

        return onnxruntime.compile_model(model, int8, calibration, keep_float, threads)
    raise T2TViTError("the torch runtime runs the model itself; nothing to compile")


class RuntimeModel(nn.Module):
    """A model whose forward runs on another runtime; ``source`` is the PyTorch model it came from."""

    def __init__(self, source: nn.Module, run: Callable[[np.ndarray], np.ndarray], runtime: str, precision: str,
                 int8: bool = False) -> None:
        super().__init__()
        self.source, self.run, self.runtime, self.precision, self.int8 = source, run, runtime, precision, int8
        self.num_classes, self.img_size = getattr(source, "num_classes", None), getattr(source, "img_size", None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.run(x.detach().float().cpu().numpy())).to(x.device)

    def extra_repr(self) -> str:
        return f"runtime={self.runtime}, precision={self.precision}" + (", int8" if self.int8 else "")


def on_runtime(model: nn.Module, runtime: str, precision: str = "fp32", int8: bool = False,
               calibration: Sequence[np.ndarray] = (), threads: int | None = None) -> nn.Module:
    """``model`` itself for the torch runtime, else a :class:`RuntimeModel` running it on ``runtime``."""
    check(runtime, precision, int8)
    if runtime == "torch":
        return model
    return RuntimeModel(model, compile_runtime(model, runtime, precision, int8, calibration, threads),
                        runtime, precision, int8)

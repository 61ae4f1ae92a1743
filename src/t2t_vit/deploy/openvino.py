"""OpenVINO: a model converted to an OpenVINO graph, saved as IR, compiled for the CPU, quantized.

The graph comes from ``openvino.convert_model`` on the PyTorch module itself (no ONNX file in
between), with the batch axis dynamic and the inputs/outputs named as the ONNX export names them.
The compiled model gets an explicit precision hint: on a CPU with AMX/AVX512-BF16 OpenVINO would
otherwise pick bf16 for an fp32 request. int8 is NNCF's post-training quantization calibrated on
the caller's preprocessed images.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from t2t_vit.deploy.graph import INPUT_NAME, OUTPUT_NAME, example_input, input_shape
from t2t_vit.errors import T2TViTError, require

HINTS = {"fp32": "f32", "bf16": "bf16"}
EXTRA = "openvino"


def _openvino(purpose: str) -> Any:
    return require("openvino", EXTRA, purpose)


def convert(model: nn.Module) -> Any:
    """The OpenVINO graph (``openvino.Model``) of ``model`` in eval mode, any batch size."""
    ov = _openvino("the OpenVINO runtime")
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing notes about the fixed token grid
        graph = ov.convert_model(model, example_input=example_input(model),
                                 input=[ov.PartialShape([-1, *input_shape(model)])])
    graph.inputs[0].get_tensor().set_names({INPUT_NAME})
    graph.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return graph


def save(graph: Any, path: str | Path) -> Path:
    """Write the IR: ``path`` (.xml) and its weights beside it (.bin), weights kept in fp32
    (OpenVINO's default fp16 compression would change an fp32 model's outputs)."""
    ov = _openvino("writing OpenVINO IR")
    path = Path(path)
    ov.save_model(graph, str(path), compress_to_fp16=False)
    return path


def read(path: str | Path) -> Any:
    """An IR written by :func:`save` (or any OpenVINO-readable model file)."""
    return _openvino("reading OpenVINO IR").Core().read_model(str(path))


def compile_graph(graph: Any, precision: str = "fp32", threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a float32 (B, C, H, W) batch to float32 logits, run by OpenVINO on the CPU
    with ``precision`` ("fp32" or "bf16") for the float parts and ``threads`` (default torch's)."""
    ov = _openvino("the OpenVINO runtime")
    if precision not in HINTS:
        raise T2TViTError(f"OpenVINO runs precision fp32 or bf16, not {precision!r}")
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    request = ov.Core().compile_model(graph, "CPU", config).create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        # The request reuses its output buffer on the next call: hand back a copy.
        return np.array(request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0], copy=True)

    return run


def quantize(graph: Any, calibration: Sequence[np.ndarray], keep_float: Iterable[str] = ()) -> Any:
    """NNCF post-training int8 quantization of ``graph`` calibrated on ``calibration`` (preprocessed
    float32 batches); nodes whose names match a regular expression of ``keep_float`` stay float."""
    nncf = require("nncf", EXTRA, "int8 quantization for OpenVINO")
    if not calibration:
        raise T2TViTError("int8 quantization needs calibration images: --calib-data DIR")
    patterns = list(keep_float)
    nncf.set_log_level(logging.ERROR)  # its per-node INFO lines would bury the command's output
    with contextlib.redirect_stdout(sys.stderr):  # progress bars: keep stdout for results (predict --json)
        return nncf.quantize(graph, nncf.Dataset(list(calibration)), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(calibration),  # NNCF counts dataset items: our batches
                             ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=False) if patterns else None)

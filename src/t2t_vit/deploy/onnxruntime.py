"""ONNX Runtime: a model exported to ONNX (:func:`t2t_vit.deploy.graph.export_onnx`) run on the
CPU provider, fp32 or int8 (``onnxruntime.quantization.quantize_static``, QDQ format, calibrated on
the caller's preprocessed images)."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from t2t_vit.deploy.graph import INPUT_NAME, export_onnx
from t2t_vit.errors import T2TViTError, require

EXTRA = "export"


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ``InferenceSession`` on the CPU provider with ``threads`` intra-op threads (default torch's)."""
    ort = require("onnxruntime", EXTRA, "the ONNX Runtime runtime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads or torch.get_num_threads(), 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_file(source: Path, target: Path, calibration: Sequence[np.ndarray], keep_float: Iterable[str] = ()) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) of the ONNX file ``source`` into ``target``;
    nodes whose module path (the exporter's ``namespace`` metadata) or name matches a regular
    expression of ``keep_float`` stay float."""
    require("onnxruntime", EXTRA, "int8 quantization for ONNX Runtime")
    from onnxruntime import quantization as q

    if not calibration:
        raise T2TViTError("int8 quantization needs calibration images: --calib-data DIR")

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    import onnx

    exclude = [node.name for node in onnx.load(str(source)).graph.node
               if any(re.search(k, f"{node.name} {_namespace(node)}") for k in keep_float)]
    q.quantize_static(str(source), str(target), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8, nodes_to_exclude=exclude)
    return target


def _namespace(node: Any) -> str:
    return next((p.value for p in node.metadata_props if p.key == "namespace"), "")


def compile_model(model: nn.Module, int8: bool = False, calibration: Sequence[np.ndarray] = (),
                  keep_float: Iterable[str] = (), threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a float32 (B, C, H, W) batch to float32 logits, run by ONNX Runtime."""
    with tempfile.TemporaryDirectory(prefix="t2t-vit-ort-") as folder:
        path = export_onnx(model, Path(folder) / "model.onnx")
        if int8:
            path = quantize_file(path, Path(folder) / "model.int8.onnx", calibration, keep_float)
        sess = session(path, threads)  # the session holds the graph; the files can go

    def run(batch: np.ndarray) -> np.ndarray:
        return sess.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return run

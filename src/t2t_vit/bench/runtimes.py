"""Benchmark cases on OpenVINO and ONNX Runtime, each timed in a fresh process.

OpenVINO's worker threads keep spinning after a call, which slows PyTorch cases timed in the same
process severalfold (and ONNX Runtime's pool competes likewise), so a runtime case is built,
warmed and timed in its own interpreter with the parent's thread count, and only its times come
back. int8 cases are calibrated on random images: right for timing, not for accuracy (agreement
is measured on real images by ``benchmarks/deploy_agreement.py``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from t2t_vit.errors import T2TViTError

# mode -> (runtime, precision of the float parts, int8)
RUNTIME_MODES = {
    "openvino": ("openvino", "fp32", False),
    "openvino-bf16": ("openvino", "bf16", False),
    "openvino-int8": ("openvino", "bf16", True),
    "onnx-int8": ("onnxruntime", "fp32", True),
}


def runtime_kernel(mode: str) -> str:
    """What runs, for the kernel column: e.g. ``openvino bf16`` or ``onnxruntime int8``."""
    runtime, precision, int8 = RUNTIME_MODES[mode]
    return f"{runtime} {'int8+' + precision if int8 and runtime == 'openvino' else 'int8' if int8 else precision}"


def _child(name: str, mode: str, batch: int, img_size: int, repeats: int, threads: int) -> None:
    """Runs in a fresh interpreter: build, compile for the runtime, warm up, time; JSON on stdout."""
    import time

    import t2t_vit
    from t2t_vit import deploy
    from t2t_vit.bench.cases import OTHERS, build_other

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_other(name, img_size) if name in OTHERS else t2t_vit.create_model(name, img_size=img_size)
    images = torch.randn(batch, 3, img_size, img_size)
    runtime, precision, int8 = RUNTIME_MODES[mode]
    calibration = [torch.randn(batch, 3, img_size, img_size).numpy() for _ in range(4)] if int8 else ()
    start = time.perf_counter()
    run = deploy.compile_runtime(model.eval(), runtime, precision, int8, calibration, threads)
    build_s = time.perf_counter() - start
    got = run(images.numpy())  # the warm-up call
    with torch.inference_mode():
        max_diff = float((torch.from_numpy(got) - model(images)).abs().max())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images.numpy())
        times.append(time.perf_counter() - start)
    print(json.dumps(dict(times=times, max_diff=max_diff, build_s=build_s)))


def time_runtime_case(name: str, mode: str, batch: int, img_size: int, repeats: int) -> dict:
    """``repeats`` timed inference calls of ``name`` on the runtime of ``mode`` at ``batch``, in a
    fresh process: {times, max_diff (vs eager fp32), build_s}."""
    if mode not in RUNTIME_MODES:
        raise T2TViTError(f"unknown runtime mode {mode!r}; choose one of {', '.join(RUNTIME_MODES)}")
    code = (f"from t2t_vit.bench.runtimes import _child; "
            f"_child({name!r}, {mode!r}, {batch}, {img_size}, {repeats}, {torch.get_num_threads()})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise T2TViTError(f"the {mode} case of {name} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])

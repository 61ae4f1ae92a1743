"""The cases a benchmark times: T2T-ViT in each mode, timm's models of the same budget, ONNX Runtime.

A case is built once, run once (warm-up, compilation, optimizer state) and handed to the timer as
a closure with no arguments. Modes of a T2T-ViT model:

- ``reference``: the paper's formulation (:func:`t2t_vit.switchboard.reference_formulation`:
  plain softmax attention, the einsum Performer, ``nn.Unfold`` soft splits), fp32, eager;
- ``reference-bf16``: the same under bf16 autocast (what a user of the paper's code would do);
- ``fp32``: our defaults, fp32;
- ``bf16``: inference with the explicit bf16 model of :func:`t2t_vit.precision.for_inference`;
  a training step runs the defaults under bf16 autocast;
- ``onnx``: the fp32 defaults exported to ONNX, run by ONNX Runtime on the CPU (inference only);
- ``compile`` / ``compile-bf16``: ``fp32`` / ``bf16`` under ``torch.compile`` (opt-in; inductor,
  with weight freezing for inference on the CPU), with the number of graph breaks
  ``torch._dynamo.explain`` finds;
- ``openvino`` / ``openvino-bf16`` / ``openvino-int8`` / ``onnx-int8``: the model on OpenVINO (f32,
  bf16, NNCF int8) or ONNX Runtime (int8), each timed in a fresh process
  (:mod:`t2t_vit.bench.runtimes`; inference on the CPU only, also for timm's models).

timm's models (:data:`OTHERS`) run in ``fp32`` and ``bf16-autocast``, in inference also ``bf16``
(weights cast by the same ``for_inference``), and in the compiled and runtime modes asked for the
T2T-ViT model beside them.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import t2t_vit
from t2t_vit.errors import T2TViTError, require
from t2t_vit.precision import autocast, for_inference

from t2t_vit.switchboard import attention_kernels, reference_formulation

MODELS = ("t2t_vit_7", "t2t_vit_14", "t2t_vit_t_14", "t2t_vit_24")
DEFAULT_MODELS = ("t2t_vit_14", "t2t_vit_t_14")
QUICK_MODELS = ("t2t_vit_14",)
OTHERS = ("deit_small_patch16_224", "resnet50")  # timm models of T2T-ViT-14's budget (22M, 26M)
COMPILE_BATCH = 8
AGREEMENT_MODEL = "t2t_vit_14"
RUNTIME_MODES = ("openvino", "openvino-bf16", "openvino-int8", "onnx-int8")  # see t2t_vit.bench.runtimes
MODES = ("reference", "reference-bf16", "fp32", "bf16", "onnx", "compile", "compile-bf16", *RUNTIME_MODES)
DEFAULT_MODES = ("reference", "reference-bf16", "fp32", "bf16", "onnx")
QUICK_MODES = ("reference", "reference-bf16", "fp32", "bf16")
OTHER_MODES = ("fp32", "bf16-autocast")
OTHER_INFER_MODES = (*OTHER_MODES, "bf16")  # in training, bf16 is autocast
GPU_MODELS = ("t2t_vit_14", "t2t_vit_t_14")
GPU_TASKS = (("infer", 256), ("train", 64), ("train", 128), ("train", 256))


# ---- cases ----------------------------------------------------------------------------------
def precision_of(mode: str) -> str:
    return "bf16" if "bf16" in mode else "fp32"


def build_case(name: str, mode: str, base: nn.Module | None = None, **model_kwargs) -> nn.Module:
    """The T2T-ViT ``name`` set up for ``mode`` (one of :data:`MODES` but onnx): a copy of ``base``
    (the same weights for every case, and no second initialisation) or a new model."""
    if mode not in MODES or mode == "onnx" or mode in RUNTIME_MODES:
        raise T2TViTError(f"unknown benchmark mode {mode!r}; choose one of {', '.join(MODES)}")
    model = copy.deepcopy(base) if base is not None else t2t_vit.create_model(name, **model_kwargs)
    if mode.startswith("reference"):
        reference_formulation(model)
    return model


def build_other(name: str, img_size: int = 224) -> nn.Module:
    """One of timm's models in :data:`OTHERS`, randomly initialised, at ``img_size``."""
    import timm

    if name not in OTHERS:
        raise T2TViTError(f"unknown comparison model {name!r}; choose one of {', '.join(OTHERS)}")
    kwargs = dict(img_size=img_size) if name.startswith("deit") else {}  # a CNN takes any size
    return timm.create_model(name, pretrained=False, **kwargs)


def compile_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under ``torch.compile`` (inductor) for inference: on the CPU with its weights frozen
    into the graph, which inductor needs to pre-pack them for oneDNN."""
    return torch.compile(model, backend="inductor", options=dict(freezing=device.type == "cpu"))


def make_step(model: nn.Module, mode: str, task: str, images: Tensor, labels: Tensor) -> Callable[[], None]:
    """A closure running one inference forward or one SGD training step of ``model`` in ``mode``.

    Inference in modes ``bf16`` and ``compile-bf16`` runs the explicit bf16 model of
    ``for_inference`` (no autocast); every other bf16 mode, and every bf16 training step, runs
    under bf16 autocast. Compiled inference: :func:`compile_for_inference`.
    """
    precision, device = precision_of(mode), images.device
    compiled = mode.startswith("compile")
    if task == "infer":
        model.eval()
        if mode in ("bf16", "compile-bf16"):  # bf16 images too: timm's models do not cast their input
            model, precision = for_inference(model, dtype=torch.bfloat16), "fp32"
            images = images.to(torch.bfloat16)
        if compiled:
            model = compile_for_inference(model, device)

        def infer() -> None:
            with torch.inference_mode(), autocast(device, precision):
                model(images)

        infer.model, infer.images, infer.precision = model, images, precision  # what runs (kernel report, graph breaks)
        return infer
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    if compiled:
        model = torch.compile(model, backend="inductor")

    def train() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train.model, train.images, train.precision = model, images, precision
    return train


def kernel_summary(name: str, model: nn.Module, mode: str, task: str = "infer", img_size: int = 224,
                   device: str = "cpu") -> str:
    """Which kernel each softmax attention of the case runs, counted (e.g. ``math x14``), and the
    Performer formulation of the T2T layers (e.g. ``performer-matmul x2``)."""
    if mode == "onnx":
        return "onnxruntime MatMul+Softmax"
    if name in OTHERS:
        timm_attention = [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "qkv")]
        if not timm_attention:
            return "none (convolutions)"
        return f"{'fused' if all(m.fused_attn for m in timm_attention) else 'math'} x{len(timm_attention)}"
    model = getattr(model, "_orig_mod", model)  # compiled: the module it wraps
    dtype = torch.bfloat16 if precision_of(mode) == "bf16" else torch.float32
    kernels = list(attention_kernels(model, input_size=(3, img_size, img_size), dtype=dtype,
                                     grad=task == "train", device=device).values())
    kernels += [f"performer-{m.performer_formulation}" for m in model.modules() if hasattr(m, "performer_formulation")]
    counts = {k: kernels.count(k) for k in dict.fromkeys(kernels)}
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "none"


def graph_breaks(model: nn.Module, images: Tensor, precision: str) -> int:
    """How many graph breaks dynamo finds in ``model``'s forward (``torch._dynamo.explain``)."""
    with torch.no_grad(), autocast(images.device, precision):
        return int(torch._dynamo.explain(model)(images).graph_break_count)


def _onnx_step(model: nn.Module, images: Tensor, folder: str) -> tuple[Callable[[], None], float]:
    """Export ``model`` to ONNX, open it in ONNX Runtime (this process's thread count); the step and
    the largest |ONNX - eager| logit difference on ``images``."""
    ort = require("onnxruntime", "export", "the ONNX Runtime benchmark case")
    require("onnxscript", "export", "the ONNX Runtime benchmark case")
    from t2t_vit.deploy.graph import export_onnx

    path = export_onnx(model.eval(), os.path.join(folder, "model.onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.cpu().numpy()}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.inference_mode():
        diff = (got - model(images).cpu()).abs().max().item()
    return (lambda: session.run(None, feed)), diff


def warm_case(
    name: str, mode: str, task: str, base: nn.Module | None, images: Tensor, labels: Tensor, img_size: int,
    folder: str | None = None,
) -> dict:
    """Build one case and run it once (warm-up, compilation, optimizer state): its step, kernel, GPU peak MB."""
    device = images.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)  # the cases built before this one
        torch.cuda.reset_peak_memory_stats(device)
    case = dict(peak_mb=None)
    if name in OTHERS:
        model = (copy.deepcopy(base) if base is not None else build_other(name, img_size)).to(device)
        step = make_step(model, mode, task, images, labels)
    elif mode == "onnx":
        model = build_case(name, "fp32", base, img_size=img_size)
        step, case["onnx_max_diff"] = _onnx_step(model, images, folder or tempfile.gettempdir())
    else:
        model = build_case(name, mode, base, img_size=img_size).to(device)
        step = make_step(model, mode, task, images, labels)
    step()
    kernel = kernel_summary(name, getattr(step, "model", model), mode, task, img_size, device.type)
    case.update(step=step, kernel=kernel)
    if mode.startswith("compile"):
        case["graph_breaks"] = graph_breaks(getattr(step.model, "_orig_mod", step.model), step.images, step.precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        case["peak_mb"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return case



"""Execution choices of the model: one place, read once, copied into each module when it is built.

Each choice picks between computations of the same function; none changes weights or the
state-dict layout.

=============  ===========================  ===============================================
choice         values (default first)       what it selects
=============  ===========================  ===============================================
attention      auto, fused, math            softmax attention: ``F.scaled_dot_product_attention``
                                            ("fused"), explicit q·kᵀ → softmax → ·v ("math",
                                            the paper's code), or per call by :func:`auto_kernel`
soft_split     strided, unfold              soft split (paper Eq. 3): one strided gather from a
                                            channels-last view, or ``nn.Unfold`` + transpose
performer      matmul, einsum               Performer T2T layer: plain matmuls, or the paper's
                                            einsums with the normaliser repeated over the width
=============  ===========================  ===============================================

Defaults come from the environment once (``T2T_VIT_ATTENTION``, ``T2T_VIT_SOFT_SPLIT``,
``T2T_VIT_PERFORMER``), otherwise the first value above. With ``T2T_VIT_CALIBRATE=1``, ``auto``
in inference is decided by timing both kernels on the machine that runs them
(:func:`calibrated_kernel`), once per device, dtype and shape. A module copies its default into a plain
attribute when it is constructed (scriptable, and private to that instance);
:func:`configure` changes the choices of one model, :func:`reference_formulation` puts one model
in the paper's formulation and leaves every other model as it is.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from t2t_vit.errors import T2TViTError

CHOICES: dict[str, tuple[str, ...]] = {
    "attention": ("auto", "fused", "math"),
    "soft_split": ("strided", "unfold"),
    "performer": ("matmul", "einsum"),
}
# The paper's formulation (its reference code): what the fast paths are tested against.
REFERENCE: dict[str, str] = {"attention": "math", "soft_split": "unfold", "performer": "einsum"}
# The module attribute holding each choice; a module that has the attribute follows the choice.
ATTRIBUTE: dict[str, str] = {
    "attention": "attention_kernel", "soft_split": "soft_split_method", "performer": "performer_formulation",
}
ENVIRONMENT: dict[str, str] = {name: f"T2T_VIT_{name.upper()}" for name in CHOICES}

_defaults: dict[str, str] | None = None

# ---- the shipped rule behind attention="auto" -------------------------------------------------
def auto_kernel(device: str, dtype: torch.dtype, tokens: int, grad: bool) -> str:
    """The attention kernel "auto" runs: "fused" or "math" for this device, dtype, length, grad mode.

    CUDA always gets the fused kernel (flash / memory-efficient attention). On the CPU the fused
    kernel wins at long sequences and loses at short ones; the lengths below from which it is used
    are the crossovers in ``benchmarks/results-attention-kernels.json`` (written by
    ``benchmarks/attention_kernels.py``). In bf16 training the fused kernel is taken at long
    sequences even where it is a little slower, for the memory it saves: math stores the N×N matrix
    for the backward pass (the figures: docs/benchmarks.md, "The attention rule and the memory
    rule"). Other devices and dtypes get plain matmuls.
    """
    if device == "cuda":
        return "fused"
    if device != "cpu":
        return "math"  # e.g. "meta" (counting FLOPs): the formulation every counter understands
    if dtype == torch.float32:
        start = 577 if grad else 197
    elif dtype == torch.bfloat16:
        start = 3136
    else:
        return "math"
    return "fused" if tokens >= start else "math"


# ---- the rule calibrated on the machine that runs it -------------------------------------------
CALIBRATE_ENV, CACHE_ENV = "T2T_VIT_CALIBRATE", "T2T_VIT_KERNEL_CACHE"
_calibrated: dict[str, str] = {}  # key (device, threads, dtype, shapes) -> kernel, this process
_loaded_from: set[str] = set()


def calibration_enabled() -> bool:
    """Whether ``auto`` is calibrated here (``T2T_VIT_CALIBRATE=1``); off by default."""
    return os.environ.get(CALIBRATE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def kernel_cache_file() -> Path | None:
    """Where calibrations persist: ``T2T_VIT_KERNEL_CACHE`` (empty: this process only), else
    ``$XDG_CACHE_HOME/t2t-vit/attention-kernels.json`` (``~/.cache`` without it)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return Path(value).expanduser() if value.strip() else None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "t2t-vit" / "attention-kernels.json"


def _calibration_key(q: torch.Tensor, k: torch.Tensor) -> str:
    where = torch.cuda.get_device_name(q.device) if q.is_cuda else platform.processor() or platform.machine()
    shapes = "x".join(map(str, q.shape)) + "/" + "x".join(map(str, k.shape))
    return f"{q.device.type}|{where}|{torch.get_num_threads()} threads|{str(q.dtype).replace('torch.', '')}|{shapes}"


def _measurable(q: torch.Tensor) -> bool:
    """A real tensor on a device that computes (not a fake, meta or traced one)."""
    return type(q) is torch.Tensor and q.device.type in ("cpu", "cuda")


def time_kernels(attention: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds of ``attention(q, k, v, scale, 0.0, kernel)`` with the fused and
    the math kernel on these inputs, interleaved."""
    best = {"fused": float("inf"), "math": float("inf")}
    with torch.no_grad():
        for round_ in range(repeats + 1):  # the first round warms up
            for kernel in best:
                if q.is_cuda:
                    torch.cuda.synchronize(q.device)
                start = time.perf_counter()
                attention(q, k, v, scale, 0.0, kernel)
                if q.is_cuda:
                    torch.cuda.synchronize(q.device)
                if round_:
                    best[kernel] = min(best[kernel], time.perf_counter() - start)
    return best


def _cache_read(path: Path) -> dict[str, str]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again
    return {k: v for k, v in found.items() if v in ("fused", "math")} if isinstance(found, dict) else {}


def _cache_write(path: Path, key: str, kernel: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_cache_read(path), key: kernel}
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)  # readers see the old or the new file, never half of one
    except OSError:
        pass  # a read-only cache is no reason to fail a forward pass; the choice stays in memory


def calibrated_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, grad: bool,
                      attention: Callable[..., torch.Tensor]) -> str:
    """The kernel ``auto`` runs for these inputs: :func:`auto_kernel` (the shipped measurement),
    unless calibration is on, in which case inference (no grad) gets whichever kernel was faster
    when both were timed on inputs of this shape, here — measured once and kept per device, thread
    count, dtype and shape (in this process and in :func:`kernel_cache_file`). Training keeps the
    shipped rule, which also weighs the memory the math kernel stores for the backward pass.
    ``attention`` is the function with both kernels (:func:`t2t_vit.layers.softmax_attention`).
    Never called while scripting; under ``torch.compile`` and export it returns the shipped rule.
    """
    # is_compiling first: dynamo folds it to a constant and traces no timing code (no graph break)
    if torch.compiler.is_compiling() or grad or not calibration_enabled() or not _measurable(q):
        return auto_kernel(q.device.type, q.dtype, q.shape[-2], grad)
    key = _calibration_key(q, k)
    if key not in _calibrated:
        path = kernel_cache_file()
        if path is not None and str(path) not in _loaded_from:
            _calibrated.update(_cache_read(path))
            _loaded_from.add(str(path))
        if key not in _calibrated:
            times = time_kernels(attention, q, k, v, scale)
            _calibrated[key] = min(times, key=times.get)
            if path is not None:
                _cache_write(path, key, _calibrated[key])
    return _calibrated[key]


def forget_calibration() -> None:
    """Drop this process's calibrations (the cache file is read again on next use)."""
    _calibrated.clear()
    _loaded_from.clear()


# ---- defaults -------------------------------------------------------------------------------
def _checked(name: str, value: str, source: str) -> str:
    if name not in CHOICES:
        raise T2TViTError(f"unknown execution choice {name!r} ({source}); choose from {', '.join(CHOICES)}")
    if value not in CHOICES[name]:
        raise T2TViTError(f"{source}: {name}={value!r} is not one of {', '.join(CHOICES[name])}")
    return value


def defaults() -> dict[str, str]:
    """The process-wide defaults, read from the environment on first use and kept."""
    global _defaults
    if _defaults is None:
        found = {}
        for name, options in CHOICES.items():
            value = os.environ.get(ENVIRONMENT[name], "").strip().lower() or options[0]
            found[name] = _checked(name, value, f"environment variable {ENVIRONMENT[name]}")
        _defaults = found
    return dict(_defaults)


def default(name: str) -> str:
    """The default of one choice; modules call this once, in their constructor."""
    return defaults()[name]


# ---- per model ------------------------------------------------------------------------------
def configure(model: nn.Module, **choices: str) -> nn.Module:
    """Set execution choices on every module of ``model`` (only this instance); returns ``model``.

    Example: ``configure(model, attention="fused", soft_split="unfold")``.
    """
    for name, value in choices.items():
        _checked(name, value, "configure()")
    for module in model.modules():
        for name, value in choices.items():
            if hasattr(module, ATTRIBUTE[name]):
                setattr(module, ATTRIBUTE[name], value)
    return model


def reference_formulation(model: nn.Module, enable: bool = True) -> nn.Module:
    """The paper's formulation for this model only (``enable=False``: back to the defaults).

    Math attention, ``nn.Unfold`` soft split, einsum Performer with the width-repeated normaliser.
    Weights, precision and the state-dict layout are untouched.
    """
    return configure(model, **(REFERENCE if enable else defaults()))


def choices_of(model: nn.Module) -> dict[str, list[str]]:
    """The distinct values each choice has in ``model`` (empty where no module follows it)."""
    found: dict[str, list[str]] = {name: [] for name in CHOICES}
    for module in model.modules():
        for name, attribute in ATTRIBUTE.items():
            value = getattr(module, attribute, None)
            if value is not None and value not in found[name]:
                found[name].append(value)
    return found


def attention_kernels(
    model: nn.Module, input_size: tuple[int, int, int] | None = None, dtype: torch.dtype = torch.float32,
    grad: bool = False, device: str = "cpu",
) -> dict[str, str]:
    """Which kernel each softmax attention runs for one case: {module name: "fused" | "math"}.

    The model is run once on a meta-device copy (nothing computed) to learn each attention's
    sequence length at ``input_size`` (default: the model's own); ``auto`` is resolved with
    :func:`auto_kernel` for ``device``, ``dtype`` and ``grad``.
    """
    lengths: dict[str, int] = {}
    meta_model = copy.deepcopy(model).to("meta").eval()
    handles = []
    for name, module in meta_model.named_modules():
        if hasattr(module, ATTRIBUTE["attention"]):
            hook = (lambda n: lambda mod, args: lengths.__setitem__(n, int(args[0].shape[-2])))(name)
            handles.append(module.register_forward_pre_hook(hook))
    size = input_size or (3, *getattr(model, "img_size", (224, 224)))
    try:
        with torch.no_grad():
            meta_model(torch.empty(1, *size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    kernels = {}
    for name, module in meta_model.named_modules():
        kernel = getattr(module, ATTRIBUTE["attention"], None)
        if kernel is not None and name in lengths:
            kernels[name] = auto_kernel(device, dtype, lengths[name], grad) if kernel == "auto" else kernel
    return kernels


"""Numeric precisions: the one table of their names, autocast for training and evaluation, and
the one cast of a model to low precision for inference.

Unlike the execution choices of :mod:`t2t_vit.switchboard`, :func:`for_inference` changes the
numbers a model computes (its weights are cast), so it lives here, beside the precision table.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from t2t_vit.errors import T2TViTError

# name → the dtype low-precision code runs in (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def check_precision(precision: str) -> str:
    """``precision`` if it is a known name ("fp32", "bf16", "fp16"), else one clear error."""
    if precision not in PRECISIONS:
        raise T2TViTError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def as_dtype(value: str | torch.dtype, who: str = "precision") -> torch.dtype:
    """A floating dtype from a dtype or a name ("bf16", "bfloat16", "fp16", "fp32", ...); ``who``
    names the caller in the error."""
    name = _DTYPE_NAMES.get(value.lower(), value.lower()) if isinstance(value, str) else None
    if isinstance(value, torch.dtype):
        dtype = value
    elif name in PRECISIONS:
        dtype = PRECISIONS[name] or torch.float32
    else:
        raise T2TViTError(f"{who}: unknown precision {value!r}; give a torch dtype or one of "
                          f"{', '.join([*PRECISIONS, *_DTYPE_NAMES])}")
    if not dtype.is_floating_point:
        raise T2TViTError(f"{who}: a precision must be a floating-point dtype, got {dtype}")
    return dtype


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The autocast context for ``precision`` on ``device`` (none for fp32)."""
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def for_inference(model: nn.Module, dtype: torch.dtype | str = torch.bfloat16) -> nn.Module:
    """``model`` ready for low-precision inference: weights in ``dtype``, eval mode; returns it.

    Unlike ``torch.autocast``, no weight is cast per call: the cast happens once, here. Buffers a
    module lists in ``fp32_buffers`` (the Performer's random projection ``w``) stay float32, and the
    Performer's feature maps and normaliser are computed in float32 as always; LayerNorm, softmax
    and matmuls run in ``dtype`` (with float32 accumulation in PyTorch's kernels). Images may
    still be passed in float32: the model casts its input to its weights' dtype. Logits come out
    in ``dtype``. Convert a copy (``copy.deepcopy``) to keep the float32 model too. ``dtype`` may
    be a name: "bf16", "fp16", "fp32".
    """
    dtype = as_dtype(dtype, "for_inference")
    kept = [(module, name, getattr(module, name)) for module in model.modules()
            for name in getattr(module, "fp32_buffers", ())]
    model.to(dtype).eval()
    for module, name, tensor in kept:
        setattr(module, name, tensor.float())
    return model

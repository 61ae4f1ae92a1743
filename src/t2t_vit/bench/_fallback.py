"""The switchboard's three functions on the older class switches, for a tree without
``t2t_vit.switchboard``: the benchmark imports these only when that module is missing."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from t2t_vit.layers import Attention
from t2t_vit.t2t import SoftSplit, TokenPerformer


def reference_formulation(model: nn.Module) -> nn.Module:
    """Plain softmax attention, the einsum Performer and ``nn.Unfold`` soft splits; returns ``model``."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = False
        elif isinstance(module, TokenPerformer):
            module.fused = False
        elif isinstance(module, SoftSplit):
            module.strided = False
    return model


class _Autocast(nn.Module):
    """``model`` under autocast to ``dtype``: the older bf16 inference path."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x)


def for_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    return _Autocast(model.eval(), dtype)


def attention_kernels(model: nn.Module, input_size=None, dtype=torch.float32, grad=False, device="cpu") -> dict[str, str]:
    """Module name -> the softmax attention kernel its switch selects ("fused" or "math")."""
    return {name: "fused" if module.fused_attn else "math"
            for name, module in model.named_modules() if isinstance(module, Attention)}

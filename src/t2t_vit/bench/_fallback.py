"""``for_inference`` for a switchboard that does not have it yet: the model under bf16 autocast.
The benchmark imports this only when ``t2t_vit.switchboard.for_inference`` is missing."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class _Autocast(nn.Module):
    """``model`` under autocast to ``dtype``: the older bf16 inference path."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        if not torch.amp.is_autocast_available(x.device.type):  # "meta": counting, nothing computed
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x)


def for_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    return _Autocast(model.eval(), dtype)

"""Reading and writing checkpoints (placeholder: the checkpoint issue fills this in)."""
from __future__ import annotations

from torch import nn


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Adapt a state dict (authors' layout or ours) to ``model`` for timm's pretrained loader."""
    return state_dict

"""Tokens-to-Token Vision Transformers (T2T-ViT, Yuan et al., ICCV 2021).

Importing the package registers every model with timm, so ``timm.create_model("t2t_vit_14")``
works as well as :func:`t2t_vit.create_model`.
"""
from __future__ import annotations

from typing import Any

import timm

from t2t_vit.checkpoint import load_checkpoint, read_metadata, read_state_dict, save_weights
from t2t_vit.errors import T2TViTError
from t2t_vit.model import T2TViT, set_fused_attn
from t2t_vit.pretrained import from_pretrained, save_pretrained
from t2t_vit.switchboard import attention_kernels, configure, for_inference, reference_formulation
from t2t_vit.variants import VARIANTS, list_models

__version__ = "0.1.0"
__all__ = [
    "T2TViT", "T2TViTError", "VARIANTS", "create_model", "list_models", "set_fused_attn", "__version__",
    "load_checkpoint", "read_state_dict", "read_metadata", "save_weights", "save_pretrained", "from_pretrained",
    "configure", "reference_formulation", "attention_kernels", "for_inference",
]


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    checkpoint_path: str | None = None,
    **kwargs: Any,
) -> T2TViT:
    """Build a registered T2T-ViT model.

    Args:
        name: one of :func:`list_models`.
        pretrained: load weights from ``checkpoint_path`` (nothing is ever downloaded).
        num_classes: classifier width; 0 gives a feature extractor without head.
        img_size: input size, int or (height, width).
        checkpoint_path: a local checkpoint (the authors' ``.pth.tar``, ours, or ``.safetensors``).
        **kwargs: any :class:`T2TViT` argument, e.g. ``stem="small"``, ``drop_path_rate=0.1``.
    """
    if name not in VARIANTS:
        import difflib

        close = difflib.get_close_matches(name, list(VARIANTS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `t2t-vit profile --all` for the list"
        raise T2TViTError(f"unknown model {name!r}{hint}")
    if pretrained and not checkpoint_path:
        raise T2TViTError(
            "pretrained=True needs checkpoint_path: this library never downloads weights; "
            "pass the path of a local checkpoint"
        )
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
    if checkpoint_path:
        from t2t_vit.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model

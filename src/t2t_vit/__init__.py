"""Tokens-to-Token Vision Transformers (T2T-ViT, Yuan et al., ICCV 2021).

Importing the package registers every model with timm, so ``timm.create_model("t2t_vit_14")``
works as well as :func:`t2t_vit.create_model`.
"""
from __future__ import annotations

from typing import Any

import timm
from timm.models import split_model_name_tag

from t2t_vit.adapting import LoadReport, adapt_state_dict
from t2t_vit.checkpoint import load_checkpoint, load_read, model_from_checkpoint
from t2t_vit.errors import T2TViTError, did_you_mean
from t2t_vit.interop import checkpoint_defaults
from t2t_vit.model import T2TViT
from t2t_vit.pretrained import from_pretrained, save_pretrained
from t2t_vit.precision import for_inference
from t2t_vit.reading import read_checkpoint, read_metadata, read_state_dict
from t2t_vit.storage import save_weights
from t2t_vit.switchboard import attention_kernels, configure, reference_formulation
from t2t_vit.variants import VARIANTS, list_models

__version__ = "0.1.0"
__all__ = [
    "T2TViT", "T2TViTError", "VARIANTS", "create_model", "list_models", "__version__",
    "load_checkpoint", "read_state_dict", "read_metadata", "save_weights", "save_pretrained", "from_pretrained",
    "read_checkpoint", "adapt_state_dict", "model_from_checkpoint", "LoadReport",
    "configure", "reference_formulation", "attention_kernels", "for_inference",
]


_LAZY_MODULES = ("inference", "dense")  # imported on first use: they pull in more than the models need


def __getattr__(name: str) -> Any:
    """``t2t_vit.inference`` / ``t2t_vit.dense`` without importing them explicitly."""
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"t2t_vit.{name}")
    raise AttributeError(f"module 't2t_vit' has no attribute {name!r}")


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    checkpoint_path: str | None = None,
    **kwargs: Any,
) -> T2TViT:
    """Build a registered T2T-ViT model, optionally with weights.

    Args:
        name: one of :func:`list_models`, optionally with a pretrained tag (``"t2t_vit_14.in1k"``;
            see ``timm.list_pretrained("t2t_vit*")``).
        pretrained: load the tag's released weights: downloaded once into torch's cache
            (``$TORCH_HOME/hub/checkpoints``), read weights-only, EMA copy preferred. With
            ``checkpoint_path`` that local file is used instead and nothing is downloaded.
        num_classes: classifier width (default: the checkpoint's, else the tag's, else 1000); 0 gives
            a feature extractor. A class count other than the weights' keeps a fresh head.
        img_size: input size, int or (height, width) (default: the checkpoint's, else the tag's, else
            224); the position table of loaded weights is resampled to it.
        checkpoint_path: a local checkpoint (the authors' ``.pth.tar``, ours, ``.safetensors`` or a
            save_pretrained directory). Its class count, preprocessing (``pretrained_cfg``, which
            timm's ``resolve_data_config`` reads) and, when it names this model, its architecture
            arguments are the defaults.
        **kwargs: any :class:`T2TViT` argument, e.g. ``stem="small"``, ``drop_path_rate=0.1``.
    """
    arch, _ = split_model_name_tag(name)
    if arch not in VARIANTS:
        hint = did_you_mean(arch, VARIANTS) or "; see `t2t-vit profile --all` for the list"
        raise T2TViTError(f"unknown model {name!r}{hint}")
    if "." in name and name not in timm.list_pretrained(arch + ".*"):
        tags = ", ".join(timm.list_pretrained(arch + ".*")) or "none"
        raise T2TViTError(f"unknown pretrained tag {name!r}; {arch} has: {tags}")
    given = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size).items() if v is not None}
    if checkpoint_path:  # the file's class count, preprocessing and (if it names this model) arguments
        read = read_checkpoint(checkpoint_path)  # once: its metadata gives the defaults, its weights the model
        file_args, fields = checkpoint_defaults(arch, read[0], read[2])
        fields.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
        file_args = {k: v for k, v in file_args.items() if k not in given}  # yours win
        kwargs = {**file_args, **kwargs, "pretrained_cfg_overlay": fields}
    model = timm.create_model(name, pretrained=pretrained and not checkpoint_path, **given, **kwargs)
    if checkpoint_path:
        load_read(model, read, checkpoint_path)
    return model

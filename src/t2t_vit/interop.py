"""What a checkpoint tells timm's own clients about itself (loading layer).

timm's scripts (``validate.py``, ``train.py``) and ``resolve_data_config`` see a model only
through its ``pretrained_cfg`` and read weights with timm's own ``load_checkpoint``. This module
turns what one of our files records — the arguments the model was built with, its class count,
the preprocessing it was trained with, its class names and training data — into model
arguments and ``pretrained_cfg`` fields, and writes the torch copy of a training checkpoint that
timm's ``load_checkpoint(model, path, use_ema=...)`` reads (``state_dict`` / ``state_dict_ema``).
"""
from __future__ import annotations

import io
import os
import re
from typing import Any, Mapping

import torch
from torch import nn

from t2t_vit.metadata import FORMAT
from t2t_vit.storage import atomic_write, encode_metadata

TIMM_SUFFIX = ".pth.tar"  # timm's own checkpoint suffix; validate.py globs it in a folder
_DATA_FIELDS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


def data_tag(dataset: Any) -> str | None:
    """A pretrained-tag-like name for the training data: ``digits``, ``/data/photos`` → ``photos``."""
    if not isinstance(dataset, str) or not dataset:
        return None
    name = os.path.basename(os.path.normpath(dataset)).lower()
    return re.sub(r"[^a-z0-9_]+", "_", name).strip("_") or None


def pretrained_cfg_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields for a checkpoint's validated metadata.

    The preprocessing (``data_config``), the class names as ``label_names`` and, for files our
    trainer wrote, the training data as ``tag`` with the release fields cleared, so nothing says
    ``in1k`` for a model trained elsewhere.
    """
    data = meta.get("data_config") or {}
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in _DATA_FIELDS}
    if meta.get("class_names"):
        fields["label_names"] = tuple(meta["class_names"])
    if meta.get("format") == FORMAT:
        fields.update(tag=data_tag(meta.get("dataset")), url="", hf_hub_id=None, origin_url=None, license=None,
                      notes=(f"trained with t2t-vit on {meta['dataset']}",) if meta.get("dataset") else ())
    return fields


def _class_count(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int | None:
    if isinstance(meta.get("num_classes"), int):
        return meta["num_classes"]
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def checkpoint_defaults(variant: str, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model arguments, ``pretrained_cfg`` fields) that a checkpoint (as ``read_checkpoint`` returns
    its weights and validated metadata) says its model was built with.

    The class count always (so timm keeps a head that fits instead of dropping it); the
    architecture arguments only when the file names ``variant`` as its model. Callers apply both
    as defaults under what the user passed.
    """
    cfg = pretrained_cfg_fields(meta)
    classes = _class_count(state_dict, meta)
    if classes is not None:
        cfg["num_classes"] = classes
    kwargs: dict[str, Any] = {}
    if meta.get("model") == variant:
        kwargs.update(meta.get("model_kwargs") or {})
        kwargs.update({k: meta[k] for k in ("img_size", "stem") if meta.get(k) is not None})
    return kwargs, cfg


def timm_path(stem: str) -> str:
    """The timm-readable copy of the checkpoint ``<stem>.safetensors``."""
    return stem + TIMM_SUFFIX


def save_timm_checkpoint(path: str | os.PathLike, model: nn.Module, ema: nn.Module | None,
                         meta: Mapping[str, Any]) -> None:
    """Write ``{"state_dict", "state_dict_ema", "arch", "metadata"}`` as timm's train.py does, atomically.

    timm's ``load_checkpoint(model, path, use_ema=True)`` then loads the EMA copy and
    ``use_ema=False`` the model; plain tensors and strings only, so ``weights_only`` loading reads it.
    """
    def plain(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}

    payload: dict[str, Any] = {"state_dict": plain(model), "arch": str(meta.get("model", "")),
                               "metadata": encode_metadata(meta)}
    if ema is not None:
        payload["state_dict_ema"] = plain(ema)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getvalue())

"""Checking what a checkpoint says about itself before anything is built from it.

safetensors metadata is a str → str map written by anyone; every field we act on is decoded,
type-checked and bounded here, so a wrong value is one clear line (never a traceback, never a
huge allocation) and a model name never selects a remote source.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from t2t_vit.errors import T2TViTError
from t2t_vit.modelguard import screen_arguments

_log = logging.getLogger(__name__)

FORMAT = "t2t-vit"  # the ``format`` field of the files we write
# Every field our checkpoints carry, in the order written, and whether its value is JSON (safetensors
# metadata is str → str: these are encoded on writing and decoded before they are checked).
FIELDS: dict[str, bool] = {
    "format": False, "model": False, "model_kwargs": True, "num_classes": True, "img_size": True, "stem": False,
    "class_names": True, "preferred": False, "step": True, "epoch": True, "data_config": True, "dataset": False,
    "source": False,
}
JSON_FIELDS = tuple(name for name, is_json in FIELDS.items() if is_json)
MAX_IMG = 4096  # pixels per side
MAX_CLASSES = 100_000
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "random")
CROP_MODES = ("center", "squash", "border")
# Bounds for the architecture arguments a checkpoint may carry (inclusive).
_INT_BOUNDS = {
    "depth": (1, 256), "embed_dim": (1, 8192), "num_heads": (1, 1024), "token_dim": (1, 4096),
    "patch_size": (1, 1024), "in_chans": (1, 64), "mlp_hidden_dim": (1, 65536), "growth": (0, 4096),
    "num_classes": (0, MAX_CLASSES),
}
_FLOAT_BOUNDS = {
    "mlp_ratio": (0.0, 64.0), "t2t_kernel_ratio": (0.0, 16.0), "drop_rate": (0.0, 1.0),
    "attn_drop_rate": (0.0, 1.0), "drop_path_rate": (0.0, 1.0), "t2t_drop_rate": (0.0, 1.0),
}
_REMOTE_MARKERS = (":", "/", "\\")  # hf-hub:org/name, local-dir:..., timm/..., http://...


def checkpoint_metadata(**fields: Any) -> dict[str, Any]:
    """The metadata of a checkpoint we write: ``fields`` (names from :data:`FIELDS`) in the table's
    order, ``format`` set to :data:`FORMAT`. Every writer (training, ``save_pretrained``, ``convert``)
    builds its metadata here."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown checkpoint metadata fields {unknown}; the fields are metadata.FIELDS")
    fields = {**fields, "format": FORMAT}
    return {name: fields[name] for name in FIELDS if name in fields}


def _fail(path: Path | str, what: str) -> T2TViTError:
    return T2TViTError(f"{path}: metadata {what}")


def _int(value: Any, field: str, low: int, high: int, path: Path | str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"{field} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _fail(path, f"{field}={value} is out of range ({low}..{high})")
    return value


def _float(value: Any, field: str, low: float, high: float, path: Path | str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, f"{field} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise _fail(path, f"{field}={value} is out of range ({low}..{high})")
    return float(value)


def check_img_size(value: Any, path: Path | str = "<checkpoint>", field: str = "img_size") -> int | list[int]:
    """An int or [height, width] of ints within 1..MAX_IMG."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return [_int(v, field, 1, MAX_IMG, path) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return _int(value, field, 1, MAX_IMG, path)
    raise _fail(path, f"{field} must be an integer or [height, width], got {value!r}")


def check_model_name(value: Any, path: Path | str = "<checkpoint>") -> str:
    """A plain registered-model name: never a hub id, URL or directory (those pick a source)."""
    if not isinstance(value, str) or not value or len(value) > 200:
        raise _fail(path, f"model must be a model name, got {value!r}")
    if any(marker in value for marker in _REMOTE_MARKERS):
        raise _fail(path, f"model {value!r} names a source, not a model; a checkpoint never selects where "
                          "weights come from (pass --model NAME to choose the architecture)")
    return value


def _check_stem(value: Any, path: Path | str) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and 0 < len(value) <= 8 and all(isinstance(s, list) and len(s) == 3 for s in value):
        return [[_int(v, "model_kwargs.stem", 0, 64, path) for v in spec] for spec in value]
    raise _fail(path, f"model_kwargs.stem must be a stem name or [[kernel, stride, padding], ...], got {value!r}")


def check_model_kwargs(value: Any, path: Path | str = "<checkpoint>") -> dict[str, Any]:
    """A mapping of argument names to JSON values, every size argument bounded."""
    if not isinstance(value, Mapping):
        raise _fail(path, f"model_kwargs must be a mapping of argument names to values, got {type(value).__name__}")
    screen_arguments(None, value, path)  # no source, file or device, whatever the model
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise _fail(path, f"model_kwargs has an invalid argument name {key!r}")
        if key in _INT_BOUNDS:
            item = _int(item, f"model_kwargs.{key}", *_INT_BOUNDS[key], path)
        elif key in _FLOAT_BOUNDS:
            item = _float(item, f"model_kwargs.{key}", *_FLOAT_BOUNDS[key], path)
        elif key == "img_size":
            item = check_img_size(item, path, "model_kwargs.img_size")
        elif key == "stem":
            item = _check_stem(item, path)
        elif key == "dense_stages" and item is not None:
            if not isinstance(item, list) or not 0 < len(item) <= 16:
                raise _fail(path, f"model_kwargs.dense_stages must be a list of block counts, got {item!r}")
            item = [_int(v, "model_kwargs.dense_stages", 1, 256, path) for v in item]
        out[key] = item
    return out


def check_data_config(value: Any, path: Path | str = "<checkpoint>") -> dict[str, Any]:
    """The preprocessing a checkpoint was trained with: input_size, mean, std, crop_pct, interpolation."""
    if not isinstance(value, Mapping):
        raise _fail(path, f"data_config must be a mapping, got {type(value).__name__}")
    out: dict[str, Any] = {}
    size = value.get("input_size")
    if size is not None:
        if not isinstance(size, (list, tuple)) or len(size) != 3:
            raise _fail(path, f"data_config.input_size must be [channels, height, width], got {size!r}")
        out["input_size"] = [_int(size[0], "data_config.input_size", 1, 64, path)] + [
            _int(v, "data_config.input_size", 1, MAX_IMG, path) for v in size[1:]]
    for key in ("mean", "std"):
        stats = value.get(key)
        if stats is None:
            continue
        if not isinstance(stats, (list, tuple)) or not 0 < len(stats) <= 64:
            raise _fail(path, f"data_config.{key} must be a list of per-channel numbers, got {stats!r}")
        low = 1e-8 if key == "std" else -1e3
        out[key] = [_float(v, f"data_config.{key}", low, 1e3, path) for v in stats]
    if value.get("crop_pct") is not None:
        out["crop_pct"] = _float(value["crop_pct"], "data_config.crop_pct", 1e-3, 2.0, path)
    for key, allowed in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        if value.get(key) is not None:
            if value[key] not in allowed:
                raise _fail(path, f"data_config.{key} must be one of {', '.join(allowed)}, got {value[key]!r}")
            out[key] = value[key]
    extra = sorted(set(value) - set(out) - {"input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode"})
    if extra:
        _log.warning("%s: ignoring unknown data_config fields %s", path, ", ".join(map(str, extra)))
    return out


def _decode(raw: Mapping[str, str], path: Path | str) -> dict[str, Any]:
    out: dict[str, Any] = dict(raw)
    for key in JSON_FIELDS:
        if key in out and isinstance(out[key], str):
            try:
                out[key] = json.loads(out[key])
            except (json.JSONDecodeError, RecursionError) as err:
                raise _fail(path, f"{key} is not valid JSON ({err})") from err
    return out


def validate_metadata(raw: Mapping[str, Any], path: Path | str = "<checkpoint>") -> dict[str, Any]:
    """Decode and check a safetensors metadata map; raises :class:`T2TViTError` on a bad value."""
    meta = _decode(raw, path)
    for key in JSON_FIELDS + ("stem",):
        if key in meta and meta[key] in (None, ""):
            del meta[key]  # "not recorded" (e.g. no stem for a timm model, img_size left to the model)
    if "model" in meta and (not isinstance(meta["model"], str) or not meta["model"]):
        raise _fail(path, f"model must be a model name, got {meta['model']!r}")
    if "preferred" in meta and meta["preferred"] not in ("ema", "model"):
        raise _fail(path, f"preferred must be 'ema' or 'model', got {meta['preferred']!r}")
    if "model_kwargs" in meta:
        meta["model_kwargs"] = check_model_kwargs(meta["model_kwargs"], path)
    if "num_classes" in meta:
        meta["num_classes"] = _int(meta["num_classes"], "num_classes", 0, MAX_CLASSES, path)
    if "img_size" in meta:
        meta["img_size"] = check_img_size(meta["img_size"], path)
    if "class_names" in meta:
        names = meta["class_names"]
        if not isinstance(names, list) or len(names) > MAX_CLASSES or not all(isinstance(n, str) for n in names):
            raise _fail(path, f"class_names must be a list of strings, got {str(names)[:60]!r}")
    for key in ("step", "epoch"):
        if key in meta:
            meta[key] = _int(meta[key], key, 0, 2**53, path)
    if "data_config" in meta:
        meta["data_config"] = check_data_config(meta["data_config"], path)
    if "stem" in meta and not isinstance(meta["stem"], str):
        raise _fail(path, f"stem must be a stem name, got {meta['stem']!r}")
    return meta

"""Shipping weights: ``save_pretrained`` / ``from_pretrained`` directories and ``t2t-vit convert``.

A pretrained directory holds ``config.json`` in timm's layout (``architecture``, ``num_classes``,
``model_args``, ``pretrained_cfg``) and ``model.safetensors``, so both
``t2t_vit.from_pretrained(dir)`` and ``timm.create_model("local-dir:" + dir, pretrained=True)``
rebuild the model (after ``import t2t_vit``, which registers the architectures).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from t2t_vit.checkpoint import build_from_checkpoint, checkpoint_model_kwargs, create_checked, load_checkpoint
from t2t_vit.errors import T2TViTError
from t2t_vit.reading import FOLDER_WEIGHTS, WEIGHTS_NAME
from t2t_vit.metadata import check_data_config, check_model_kwargs, check_model_name, checkpoint_metadata
from t2t_vit.modelguard import names_a_source
from t2t_vit.storage import save_weights

CONFIG_NAME = "config.json"
_DATA_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


def _model_args(model: nn.Module) -> dict[str, Any]:
    """The kwargs that rebuild ``model`` (recorded by timm's factory; drop rates left out)."""
    from timm.models import get_model_args

    return json.loads(json.dumps(get_model_args(model)))  # tuples → lists, as they come back from JSON


def _model_metadata(model: nn.Module, class_names: Sequence[str] | None, **fields: Any) -> dict[str, Any]:
    """The metadata of ``model``'s weights file: what rebuilds it (name, arguments, classes, size), then ``fields``."""
    return checkpoint_metadata(model=model.pretrained_cfg["architecture"], model_kwargs=_model_args(model),
                               num_classes=model.num_classes, img_size=list(model.img_size),
                               class_names=list(class_names or []), preferred="model", **fields)


def _data_config(model: nn.Module, given: dict[str, Any] | None) -> dict[str, Any]:
    """The preprocessing to record: ``given`` over the model's pretrained_cfg (timm's field names)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    merged = {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in _DATA_KEYS if cfg.get(k) is not None}
    merged["input_size"] = [merged.get("input_size", [3])[0], *model.img_size] if hasattr(model, "img_size") \
        else merged.get("input_size")
    merged.update({k: list(v) if isinstance(v, tuple) else v for k, v in (given or {}).items()})
    return check_data_config({k: v for k, v in merged.items() if v is not None}, "data_config")


def _cfg_class_names(model: nn.Module) -> list[str] | None:
    """The class names a checkpoint gave the model (its pretrained_cfg ``label_names``), if they fit its head."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    fits = isinstance(names, (list, tuple)) and len(names) == getattr(model, "num_classes", -1)
    return [str(n) for n in names] if fits else None


def save_pretrained(model: nn.Module, directory: str | os.PathLike, class_names: Sequence[str] | None = None,
                    data_config: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a model built by :func:`t2t_vit.create_model`.

    ``class_names`` become timm's ``label_names``. ``data_config`` (``input_size``, ``mean``,
    ``std``, ``crop_pct``, ``interpolation``; e.g. the ``data_config`` a training checkpoint
    stores) overrides the model's pretrained_cfg; the result goes into config.json's
    ``pretrained_cfg`` (so timm's ``local-dir:`` and :func:`from_pretrained` use it) and into the
    weights' metadata.
    """
    from timm.models._hub import save_config_for_hf

    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or "architecture" not in cfg:
        raise T2TViTError("save_pretrained needs a model built by t2t_vit.create_model or timm.create_model")
    data = _data_config(model, data_config)
    class_names = class_names or _cfg_class_names(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise T2TViTError(f"save_pretrained writes a folder (config.json + {WEIGHTS_NAME}), but {directory} is "
                          "an existing file; choose another path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise T2TViTError(f"could not create {directory}: {err.strerror or err}") from err
    model_config = {"label_names": list(class_names)} if class_names else None
    try:
        save_config_for_hf(model, str(directory / CONFIG_NAME), model_config=model_config, data_config=data)
    except (OSError, ValueError) as err:
        raise T2TViTError(f"could not write {directory / CONFIG_NAME}: {err}") from err
    save_weights(model, directory / WEIGHTS_NAME, metadata=_model_metadata(model, class_names, data_config=data))
    return directory


def _read_config(directory: Path) -> dict[str, Any]:
    config_file = directory / CONFIG_NAME
    if not config_file.is_file() or not any((directory / name).is_file() for name in FOLDER_WEIGHTS):
        raise T2TViTError(f"{directory} is not a pretrained directory: it needs {CONFIG_NAME} and "
                          f"{' or '.join(FOLDER_WEIGHTS)}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise T2TViTError(f"cannot read {config_file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise T2TViTError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    for key, kind in (("architecture", str), ("model_args", dict), ("pretrained_cfg", dict), ("num_classes", int)):
        if key in config and not isinstance(config[key], kind):
            raise T2TViTError(f"{config_file}: {key} must be a {kind.__name__}, got {config[key]!r}")
    if not config.get("architecture"):
        raise T2TViTError(f"{config_file} does not name its architecture")
    return config


def from_pretrained(directory: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained`; ``overrides`` change model arguments
    (e.g. ``num_classes=10`` keeps a new head, ``img_size=384`` resamples the position table).
    The saved preprocessing (input size, mean/std, crop, interpolation) becomes the model's
    ``pretrained_cfg``, as timm's ``local-dir:`` does."""
    directory = Path(directory)
    config = _read_config(directory)
    config_file = directory / CONFIG_NAME
    name = check_model_name(config["architecture"], config_file)
    meta = {"model_kwargs": check_model_kwargs(config.get("model_args", {}), config_file)}
    if "num_classes" in config:
        meta["num_classes"] = config["num_classes"]
    kwargs = checkpoint_model_kwargs(name, meta, {}, config_file, overrides)
    saved_cfg = config.get("pretrained_cfg", {})
    saved = check_data_config({k: v for k, v in saved_cfg.items() if k in _DATA_KEYS}, config_file)
    other = {k: v for k, v in saved_cfg.items() if k not in _DATA_KEYS and isinstance(v, (str, int, float, bool))
             and k != "state_dict" and not names_a_source(k)}  # the folder's own file is the only source
    cfg = {**other, **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}}
    names = config.get("label_names")  # at the top level, as timm's local-dir reads them
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        cfg["label_names"] = tuple(names)
    kwargs.setdefault("pretrained_cfg_overlay", cfg)
    model = create_checked(name, kwargs, config_file)
    load_checkpoint(model, directory)  # model.safetensors, else pytorch_model.bin (timm's save_for_hf)
    return model


# ---- t2t-vit convert -----------------------------------------------------------------------
def convert(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None,
            use_ema: bool | None = None, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Convert any readable checkpoint (the authors' ``.pth.tar``/``.pth``, EMA preferred; ours with
    its ``model_kwargs``) to our safetensors format, after checking it loads exactly into the model
    it describes (:func:`t2t_vit.checkpoint.build_from_checkpoint`)."""
    model, meta, source = build_from_checkpoint(src, model_name, use_ema)
    data = {"data_config": meta["data_config"]} if meta.get("data_config") else {}
    metadata = _model_metadata(model, class_names or meta.get("class_names"), step=int(meta.get("step", 0) or 0),
                               epoch=int(meta.get("epoch", 0) or 0), source=f"{Path(src).name}:{source}", **data)
    save_weights(model, dst, metadata=metadata)
    return metadata


def _run_convert(args: argparse.Namespace) -> int:
    use_ema = {"auto": None, "ema": True, "model": False}[args.weights]
    meta = convert(args.input, args.output, args.model, use_ema=use_ema)
    print(f"wrote {args.output}: {meta['model']}, {meta['num_classes']} classes, "
          f"{meta['img_size'][0]}x{meta['img_size'][1]} px, weights from {meta['source']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint (e.g. the authors' .pth.tar) to .safetensors",
        description="Convert the authors' .pth.tar / .pth (or any readable checkpoint) to safetensors with "
                    "metadata. Nothing pickled is executed; the weights must load exactly into --model.",
    )
    parser.add_argument("input", help="checkpoint to read (.pth.tar, .pth, .safetensors)")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--model", help="model name (default: from the file, else guessed from tensor shapes)")
    parser.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                        help="which copy to convert (auto: EMA when present)")
    parser.set_defaults(func=_run_convert)

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

from t2t_vit.checkpoint import (
    FORMAT, WEIGHTS_NAME, describe_state_dict, likely_variants, load_checkpoint, read_checkpoint, read_metadata,
    save_weights,
)
from t2t_vit.errors import T2TViTError

CONFIG_NAME = "config.json"


def _model_args(model: nn.Module) -> dict[str, Any]:
    """The kwargs that rebuild ``model`` (recorded by timm's factory; drop rates left out)."""
    from timm.models import get_model_args

    return json.loads(json.dumps(get_model_args(model)))  # tuples → lists, as they come back from JSON


def save_pretrained(model: nn.Module, directory: str | os.PathLike, class_names: Sequence[str] | None = None,
                    data_config: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a model built by :func:`t2t_vit.create_model`.

    ``class_names`` become timm's ``label_names``; ``data_config`` (e.g. ``mean``, ``std``,
    ``crop_pct``) records preprocessing that differs from the model's defaults.
    """
    from timm.models._hub import save_config_for_hf

    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or "architecture" not in cfg:
        raise T2TViTError("save_pretrained needs a model built by t2t_vit.create_model or timm.create_model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_args = _model_args(model)
    model_config = {"label_names": list(class_names)} if class_names else None
    save_config_for_hf(model, str(directory / CONFIG_NAME), model_config=model_config, data_config=data_config)
    metadata = dict(
        format=FORMAT, model=cfg["architecture"], model_kwargs=model_args, num_classes=model.num_classes,
        img_size=list(model.img_size), class_names=list(class_names or []), preferred="model",
    )
    save_weights(model, directory / WEIGHTS_NAME, metadata=metadata)
    return directory


def model_from_checkpoint(path: str | os.PathLike | None, name: str | None = None,
                          use_ema: bool | None = None, **overrides: Any) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval, predict, teachers).

    Our checkpoints name their model and its arguments in their metadata; for other files (the
    authors') pass ``name``. ``overrides`` (e.g. ``img_size=384``, ``num_classes=10``) win over
    the metadata; None values are ignored. Without ``path`` the model is freshly initialised. A
    model name that is not a T2T-ViT is built with ``timm.create_model`` (e.g. a ResNet teacher).
    """
    import timm

    import t2t_vit

    meta = read_metadata(path) if path else {}
    name = name or meta.get("model")
    if not name:
        raise T2TViTError(f"{path} does not say which model it holds; pass --model" if path else "give a model name")
    if meta.get("model") and meta["model"] != name:
        raise T2TViTError(f"{path} holds a {meta['model']!r} model, not {name!r}; drop --model or correct it")
    explicit = dict(meta.get("model_kwargs") or {})
    kwargs = dict(explicit)
    kwargs.update({key: meta[key] for key in ("img_size", "stem", "num_classes") if meta.get(key) is not None})
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    num_classes = int(kwargs.pop("num_classes", 1000))
    if name in t2t_vit.list_models():
        model = t2t_vit.create_model(name, num_classes=num_classes, **kwargs)
    else:
        # The run's img_size/stem are T2T-ViT arguments; another timm model keeps only its own
        # (a timm ViT trained at 32 px has img_size in its model_kwargs, a ResNet has none).
        for key in ("img_size", "stem"):
            if key not in explicit:
                kwargs.pop(key, None)
        model = timm.create_model(name, num_classes=num_classes, **kwargs)
    if path:
        report = load_checkpoint(model, path, use_ema=use_ema)
        if report.replaced_head:
            raise T2TViTError(f"{path} has a {report.replaced_head[0]}-class head but the model was built "
                              f"with {report.replaced_head[1]} classes")
    return model


def from_pretrained(directory: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained`; ``overrides`` change model arguments
    (e.g. ``num_classes=10`` keeps a new head, ``img_size=384`` resamples the position table)."""
    import t2t_vit

    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise T2TViTError(f"{directory} is not a pretrained directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = json.loads(config_file.read_text())
    name = config.get("architecture")
    kwargs = {**config.get("model_args", {}), **overrides}
    kwargs.setdefault("num_classes", config.get("num_classes", 1000))
    # the saved preprocessing (input size, mean/std, crop) becomes the model's pretrained_cfg, as in timm
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get("pretrained_cfg", {}).items()}
    kwargs.setdefault("pretrained_cfg_overlay", cfg)
    model = t2t_vit.create_model(name, **kwargs)
    load_checkpoint(model, directory / WEIGHTS_NAME)
    return model


# ---- t2t-vit convert -----------------------------------------------------------------------
def _infer_model_name(meta: dict[str, Any], state_dict: dict) -> str:
    from t2t_vit.variants import VARIANTS

    names = [meta.get("model"), meta.get("arch"), (meta.get("args") or {}).get("model")]
    for name in names:
        if isinstance(name, str) and name.lower() in VARIANTS:
            return name.lower()
    guesses = likely_variants(describe_state_dict(state_dict))
    if len(guesses) >= 1:
        return guesses[0]  # same shapes (e.g. t2t_vit_14 and _14_resnext) load either way; --model picks
    raise T2TViTError("cannot tell which model this checkpoint is for; pass --model NAME")


def convert(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None,
            use_ema: bool | None = None, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Convert any readable checkpoint (the authors' ``.pth.tar``/``.pth``, EMA preferred) to our
    safetensors format, after checking it loads exactly into the model it claims to be."""
    import t2t_vit

    state_dict, source, meta = read_checkpoint(src, use_ema)
    name = model_name or _infer_model_name(meta, state_dict)
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    probe = t2t_vit.create_model(name, num_classes=num_classes)
    pos = state_dict.get("pos_embed")
    img_size = list(probe.img_size)
    if pos is not None and pos.shape[1] - 1 != probe.grid_size[0] * probe.grid_size[1]:
        side = int(round((pos.shape[1] - 1) ** 0.5))
        img_size = [side * probe.reduction] * 2  # e.g. 576 tokens → 24 × 16 = 384 px
    model = t2t_vit.create_model(name, num_classes=num_classes, img_size=img_size)
    load_checkpoint(model, src, strict=True, use_ema=use_ema)  # raises one clear line on mismatch
    metadata = dict(
        format=FORMAT, model=name, model_kwargs={}, num_classes=num_classes, img_size=img_size,
        class_names=list(class_names or []), preferred="model", step=0, epoch=int(meta.get("epoch", 0) or 0),
        source=f"{Path(src).name}:{source}",
    )
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

"""`t2t-vit train` and `t2t-vit eval`. Every TrainConfig field is a flag (``--batch-size`` for
``batch_size``; booleans also take ``--no-...``), its help and choices read from the field's rules
(``train/config.py``); flags override ``--config FILE``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

from t2t_vit.cli_args import add_model_args, add_runtime_args
from t2t_vit.errors import T2TViTError, check_range
from t2t_vit.model import to_2tuple_size
from t2t_vit.modelsource import ModelSource
from t2t_vit.precision import PRECISIONS
from t2t_vit.train.checks import read_yaml, rules
from t2t_vit.train.config import DEMO_RECIPE, FIELD_TYPES, FIELDS, TrainConfig, list_recipes, load_config


def _parse_value(kind: type, text: str):
    """Strings stay strings ("none" → None); other values are read as YAML (numbers, lists, mappings);
    ValidConfig then checks and converts the types."""
    if kind is str:
        return None if text.lower() in ("none", "null") else text
    return read_yaml(text, f"the value {text!r}")


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """One flag per field; values stay text here and are read in :func:`flag_values`, where a bad
    value becomes the usual one-line error."""
    flag = "--" + field.name.replace("_", "-")
    rule = rules(field)
    hint = "; ".join(text for text in (rule.help, rule.choices and "one of " + ", ".join(rule.choices)) if text)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    text = f"{hint} (default: {default})" if hint else f"default: {default}"
    if field.type in ("bool", bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        return
    parser.add_argument(flag, default=None, metavar=field.name.upper(), help=text)


def _img_size(text: str) -> int | list[int]:
    parts = text.replace("x", ",").split(",")
    try:
        values = [int(v) for v in parts]
    except ValueError as err:
        raise T2TViTError(f"--img-size must be a positive int or H,W, got {text!r}") from err
    return values[0] if len(values) == 1 else values


def flag_values(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line, read from their text."""
    values = {}
    for name, value in vars(args).items():
        if name not in FIELDS or value is None:
            continue
        if isinstance(value, bool):
            values[name] = value
        elif name == "img_size":
            values[name] = _img_size(value)
        else:
            kind = FIELD_TYPES[name][0]
            values[name] = _parse_value(str if kind == (str,) else object, value)
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train / fine-tune / distill a model (no arguments: the digits demo)",
                              description="Train a T2T-ViT or any timm model. With neither --config nor --model, "
                                          "the digits demo recipe is the base (configs/digits.yaml) and flags "
                                          "override it; --model NAME builds NAME as registered.")
    p.add_argument("--config", help=f"YAML recipe file or shipped recipe name ({', '.join(list_recipes())})")
    for field in dataclasses.fields(TrainConfig):
        _add_field(p, field)
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="evaluate a checkpoint or released weights: loss, top-1, top-5, throughput")
    add_model_args(e, weights_default="required: --checkpoint, or --model TAG --pretrained")
    add_runtime_args(e, precision=False, runtimes=True)
    e.add_argument("--data", default="digits")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--workers", type=int, help="loader processes (default: 0 for in-memory data sets, "
                   "else up to 8, never more than the CPUs)")
    e.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    e.add_argument("--crop-pct", type=float)
    e.set_defaults(func=run_eval)


def base_recipe(args: argparse.Namespace, finetune: ModelSource | None = None) -> str | None:
    """``--config``; else, when resuming, the run's own config.yaml; else the demo recipe when no model
    is named (``--model``, or a pretrained tag as ``finetune``, the parsed ``--finetune``)."""
    if args.config or args.model:
        return args.config
    saved = _resumed_run_config(args)
    if saved:
        return saved
    if finetune is not None and finetune.kind == "tag":
        return None
    return DEMO_RECIPE


def _resumed_run_config(args: argparse.Namespace) -> str | None:
    """The config.yaml of the run ``--resume`` continues, so that flags only need to name changes."""
    if args.resume == "auto":
        folder = args.output
    elif args.resume:
        folder = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
    else:
        return None
    path = os.path.join(folder, "config.yaml") if folder else None
    return path if path and os.path.isfile(path) else None


def run_train(args: argparse.Namespace) -> int:
    overrides = flag_values(args)
    finetune = ModelSource.parse(overrides["finetune"]) if overrides.get("finetune") is not None else None
    if finetune is not None:
        overrides["finetune"] = finetune  # parsed here, once: the config keeps this value
        if finetune.kind == "tag" and not args.model and not args.config:
            overrides["model"] = finetune.model  # --finetune t2t_vit_14.in1k alone trains a t2t_vit_14
    cfg = load_config(base_recipe(args, finetune), overrides)
    from t2t_vit.train.engine import train

    train(cfg)
    return 0


def _eval_model(args: argparse.Namespace):
    """The model to evaluate and the preprocessing it was trained with (None: the data set's)."""
    from t2t_vit.cli_args import model_source
    from t2t_vit.inference import build_model, data_config

    if not args.checkpoint and not args.pretrained:
        raise T2TViTError("name the weights to evaluate: --checkpoint FILE, or --model TAG --pretrained")
    source = model_source(args)
    if args.img_size and not args.stem and to_2tuple_size(args.img_size)[0] <= 64:
        source["stem"] = "small"  # a small input without a stem: the small-image schedule
    model, meta = build_model(**source)
    stored = meta.get("data_config") or (data_config(model, meta) if args.pretrained else None)
    return model, meta, stored


def run_eval(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from t2t_vit.data import BUILTIN, available_cores, create_datasets, resolve_workers
    from t2t_vit.data.readers import is_reader_spec
    from t2t_vit.runtime import default_device
    from t2t_vit.train.evaluate import evaluate

    check_range("--batch-size", args.batch_size, 1)
    check_range("--workers", args.workers, 0)
    if args.data not in BUILTIN and not is_reader_spec(args.data) and not os.path.exists(args.data):
        raise T2TViTError(f"data path {args.data!r} does not exist")
    model, meta, saved = _eval_model(args)
    img_size = getattr(model, "img_size", None) or tuple((saved or {}).get("input_size", (3, 224, 224))[1:])
    saved = saved or {}
    bundle = create_datasets(args.data, img_size, None, crop_pct=args.crop_pct or saved.get("crop_pct"),
                             interpolation=saved.get("interpolation", "bicubic"), mean=saved.get("mean"),
                             std=saved.get("std"))
    classes = getattr(model, "num_classes", bundle.num_classes)
    if classes != bundle.num_classes:
        raise T2TViTError(f"the model has {classes} classes but {args.data} has {bundle.num_classes}; "
                          "evaluate on the data set it was trained for")
    device = torch.device(args.device or default_device())
    workers, _ = resolve_workers(args.workers, bundle, training=False)
    if device.type == "cpu" and workers:  # intra-op threads and loader workers must not share cores
        torch.set_num_threads(max(1, min(torch.get_num_threads(), available_cores() - workers)))
    loader = DataLoader(bundle.val, batch_size=args.batch_size, num_workers=workers)
    if args.runtime != "torch" or args.int8:  # the model runs elsewhere; its precision is the runtime's
        from t2t_vit.cli_args import runtime_options
        from t2t_vit.inference import data_config, on_runtime

        model, args.precision = on_runtime(model, data_config(model, meta), precision=args.precision,
                                           **runtime_options(args)), "fp32"
    start = time.perf_counter()
    m = evaluate(model.to(device), loader, device, args.precision)
    name = args.model or meta.get("model")
    print(f"{name} on {args.data} ({m['images']} images): loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%  "
          f"top-5 {m['top5']:.2f}%  {m['images_per_s']:.0f} img/s ({time.perf_counter() - start:.1f} s)")
    return 0

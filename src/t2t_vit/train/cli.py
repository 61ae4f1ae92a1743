"""`t2t-vit train` and `t2t-vit eval`. Every TrainConfig field is a flag (``--batch-size`` for
``batch_size``; booleans also take ``--no-...``); flags override ``--config FILE``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing

import yaml

from t2t_vit.errors import T2TViTError
from t2t_vit.train.config import FIELDS, TrainConfig, list_recipes, load_config

HELP = {
    "data": "'digits' (built in), an ImageFolder root with train/ and val/, or a CIFAR-10/100 python folder",
    "model": "a T2T-ViT name (t2t-vit profile --all) or any timm model",
    "model_kwargs": "extra model arguments as YAML/JSON, e.g. '{embed_dim: 128, depth: 4}'",
    "img_size": "input size: 32 or 224 or H,W",
    "batch_size": "images per process and micro-step",
    "resume": "a checkpoint, a run directory, or 'auto' (the last checkpoint of --output)",
    "output": "run directory (default runs/<model>-<data>-<timestamp>)",
    "max_steps": "stop after this many optimizer steps",
    "augment": "--no-augment turns off random crops, flips, RandAugment, erasing, mixup/cutmix and smoothing",
    "teacher": "distillation teacher: one of our checkpoints, or a model name (+ --teacher-checkpoint)",
    "body_lr_scale": "lr of all but the classifier = lr × this (the paper's transfer recipe uses 0.01)",
    "drop_path": "stochastic depth rate",
}


def _parse_value(kind: type, text: str):
    """Strings stay strings ("none" → None); other values are read as YAML (numbers, lists, mappings);
    TrainConfig.validate() then checks and converts the types."""
    if kind is str:
        return None if text.lower() in ("none", "null") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise T2TViTError(f"cannot read the value {text!r}") from None


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    hint = HELP.get(field.name, "")
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    text = f"{hint} (default: {default})" if hint else f"default: {default}"
    if field.type in ("bool", bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        return
    kind = str if "str" in str(field.type) and "int" not in str(field.type) else object
    if field.name == "img_size":
        convert = lambda s: [int(v) for v in s.replace("x", ",").split(",")] if ("," in s or "x" in s) else int(s)
    else:
        convert = lambda s, k=kind: _parse_value(k, s)
    parser.add_argument(flag, type=convert, default=None, metavar=field.name.upper(), help=text)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train / fine-tune / distill a model (defaults: the digits demo)",
                              description="Train a T2T-ViT. With no arguments: the 32 px digits demo.")
    p.add_argument("--config", help=f"YAML recipe file or shipped recipe name ({', '.join(list_recipes())})")
    for field in dataclasses.fields(TrainConfig):
        _add_field(p, field)
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="evaluate a checkpoint: loss, top-1, top-5, throughput")
    e.add_argument("--checkpoint", required=True, help="our .safetensors or the authors' .pth/.pth.tar")
    e.add_argument("--model", help="model name (read from our checkpoints when omitted)")
    e.add_argument("--data", default="digits")
    e.add_argument("--img-size", type=lambda s: int(s) if s.isdigit() else [int(v) for v in s.split(",")])
    e.add_argument("--stem", help="soft-split schedule (read from our checkpoints when omitted)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    e.add_argument("--crop-pct", type=float)
    e.add_argument("--weights", choices=["preferred", "ema", "model"], default="preferred",
                   help="which copy of our checkpoints to use")
    e.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    cfg = load_config(args.config, overrides)
    from t2t_vit.train.engine import train

    train(cfg)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import os

    import torch
    from torch.utils.data import DataLoader

    from t2t_vit.data import create_datasets
    from t2t_vit.train.evaluate import evaluate, load_weights
    from t2t_vit.train.recipe import build_model
    from t2t_vit.train.state import read_metadata

    if args.batch_size <= 0:
        raise T2TViTError(f"--batch-size must be positive, got {args.batch_size}")
    if not os.path.isfile(args.checkpoint):
        raise T2TViTError(f"checkpoint {args.checkpoint!r} does not exist")
    if args.data != "digits" and not os.path.exists(args.data):
        raise T2TViTError(f"data path {args.data!r} does not exist")
    meta = read_metadata(args.checkpoint) if args.checkpoint.endswith(".safetensors") else {}
    name = args.model or meta.get("model")
    if not name:
        raise T2TViTError("--model is needed: the checkpoint does not name its model")
    img_size = args.img_size or (json.loads(meta["img_size"]) if "img_size" in meta else 224)
    stem = args.stem or meta.get("stem") or ("small" if img_size in (32, [32, 32]) else "imagenet")
    bundle = create_datasets(args.data, img_size, None, crop_pct=args.crop_pct)
    cfg = TrainConfig(model=name, model_kwargs=json.loads(meta.get("model_kwargs", "{}")) if meta else {},
                      img_size=img_size, stem=stem, drop_path=0.0)
    model = build_model(cfg, int(meta.get("num_classes", bundle.num_classes)))
    load_weights(model, args.checkpoint, use_ema=None if args.weights == "preferred" else args.weights == "ema")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(bundle.val, batch_size=args.batch_size, num_workers=args.workers)
    start = time.perf_counter()
    m = evaluate(model.to(device), loader, device, args.precision)
    print(f"{name} on {args.data} ({m['images']} images): loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%  "
          f"top-5 {m['top5']:.2f}%  {m['images_per_s']:.0f} img/s ({time.perf_counter() - start:.1f} s)")
    return 0

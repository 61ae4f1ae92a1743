"""Classify images with a T2T-ViT model: `t2t-vit predict IMAGE... --model NAME --checkpoint PATH`.

Also the shared inference plumbing the visualisation and export commands use: build a model
from a checkpoint's metadata (:func:`load_model`), its class names (:func:`class_names`) and
timm's evaluation transform for it (:func:`eval_transform`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from torch import Tensor

from t2t_vit.checkpoint import read_metadata
from t2t_vit.errors import T2TViTError
from t2t_vit.model import T2TViT
from t2t_vit.pretrained import model_from_checkpoint
from t2t_vit.train.evaluate import PRECISIONS, autocast

def load_model(
    name: str | None,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[T2TViT, dict[str, Any]]:
    """An eval-mode model built the way the checkpoint's metadata says, with its weights loaded,
    and that metadata. ``name`` may be None when the checkpoint names its model; explicit
    ``img_size`` and ``overrides`` (e.g. ``stem="small"``) win over the metadata."""
    if checkpoint and not Path(checkpoint).is_file():
        raise T2TViTError(f"checkpoint {str(checkpoint)!r} does not exist or is not a file")
    meta = read_metadata(checkpoint) if checkpoint else {}
    model = model_from_checkpoint(checkpoint, name, img_size=img_size, **overrides)
    return model.to(device).eval(), meta


def class_names(num_classes: int, meta: dict[str, Any] | None = None) -> list[str]:
    """Names from the checkpoint, else ImageNet's for 1000 classes, else ``class_<i>``."""
    stored = (meta or {}).get("class_names")
    if stored and len(stored) == num_classes:
        return [str(n) for n in stored]
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def eval_transform(model: T2TViT) -> Callable[[Image.Image], Tensor]:
    """timm's evaluation transform (resize, centre crop, normalise) for the model's input size."""
    config = resolve_data_config({"input_size": (3, *model.img_size)}, model=model)
    return create_transform(**config)


def read_image(path: str | Path) -> Image.Image:
    """An RGB image; raises T2TViTError with one clear sentence when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise T2TViTError(f"cannot read {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise T2TViTError(f"cannot read {str(path)!r}: it is a directory") from None
    except UnidentifiedImageError:
        raise T2TViTError(f"cannot read {str(path)!r}: not an image format PIL recognises") from None
    except (OSError, ValueError) as err:
        raise T2TViTError(f"cannot read {str(path)!r}: {err}") from None


@torch.no_grad()
def predict(
    model: T2TViT, images: Sequence[Image.Image], names: Sequence[str], topk: int = 5, batch_size: int = 32,
    precision: str = "fp32",
) -> list[list[tuple[int, str, float]]]:
    """Top-k (index, class name, probability) for each image, most probable first.

    ``precision`` "bf16" or "fp16" runs the model under autocast (the softmax stays fp32)."""
    transform = eval_transform(model)
    device = next(model.parameters()).device
    k = max(1, min(topk, len(names)))
    results = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[start : start + batch_size]]).to(device)
        with autocast(device, precision):
            logits = model(batch)
        probs, indices = logits.float().softmax(dim=-1).topk(k, dim=-1)
        for p_row, i_row in zip(probs.tolist(), indices.tolist()):
            results.append([(i, names[i], p) for i, p in zip(i_row, p_row)])
    return results


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    model, meta = load_model(args.model, args.checkpoint, args.img_size, args.device, stem=args.stem)
    names = class_names(model.num_classes, meta)
    readable, images = [], []
    failures = []
    for path in args.images:
        try:
            images.append(read_image(path))
            readable.append(path)
        except T2TViTError as err:
            failures.append({"image": path, "error": str(err)})
            print(f"t2t-vit: {err}", file=sys.stderr)
    results = predict(model, images, names, args.topk, precision=args.precision) if images else []
    if args.json:
        records = [
            {"image": path, "predictions": [{"index": i, "label": n, "probability": p} for i, n, p in top]}
            for path, top in zip(readable, results)
        ]
        print(json.dumps(records + failures, indent=2))
    else:
        for path, top in zip(readable, results):
            print(path)
            for rank, (index, name, prob) in enumerate(top, 1):
                print(f"  {rank}. {100 * prob:6.2f}%  {name} ({index})")
    if not images:
        raise T2TViTError("none of the images could be read")
    return 1 if failures else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify images: top-k class names and probabilities")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything PIL reads)")
    p.add_argument("--model", help="model name (optional when the checkpoint's metadata names it)")
    p.add_argument("--checkpoint", help="weights: a .safetensors or .pth checkpoint")
    p.add_argument("--topk", type=int, default=5, help="how many classes to list per image (default 5)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--img-size", type=int, help="input size (default: the checkpoint's, else 224)")
    p.add_argument("--stem", help="soft-split stem, e.g. 'small' (default: the checkpoint's)")
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda if available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="bf16/fp16: autocast, faster on CPUs with AMX/AVX512-BF16 and on GPUs (default fp32)")
    p.set_defaults(func=run)

"""Argument groups shared by the commands that run a model (predict, visualize, export, ...).

Each ``add_*`` function adds one group to a parser; :func:`load_inference` turns the parsed
arguments into :func:`t2t_vit.inference.load`'s keywords, so every command spells the model
source, device and precision options the same way.
"""
from __future__ import annotations

import argparse
from typing import Any

from t2t_vit.deploy import RUNTIMES
from t2t_vit.errors import check_range
from t2t_vit.inference import Inference, load
from t2t_vit.metadata import MAX_IMG
from t2t_vit.precision import PRECISIONS

WEIGHTS = {"preferred": None, "ema": True, "model": False}  # --weights → use_ema


def add_model_args(parser: argparse.ArgumentParser, weights_default: str = "random initialisation") -> None:
    """``--model`` (name or pretrained tag), ``--pretrained``, ``--checkpoint``, ``--weights``,
    ``--img-size``, ``--stem``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="registered model name or pretrained tag, e.g. t2t_vit_14 or "
                                       "t2t_vit_14.in1k (optional when the checkpoint names its model)")
    group.add_argument("--pretrained", action="store_true",
                       help="load the released weights of --model (downloaded once into the torch cache)")
    group.add_argument("--checkpoint", help=f"weights: .safetensors, .pth(.tar) or a save_pretrained folder "
                                            f"(default: {weights_default})")
    group.add_argument("--weights", choices=list(WEIGHTS), default="preferred",
                       help="which copy of a checkpoint with EMA weights to use (default: the one it prefers)")
    group.add_argument("--img-size", type=int, help="input size (default: the checkpoint's, else the model's)")
    group.add_argument("--stem", help="soft-split stem, e.g. 'small' (default: the checkpoint's)")


def add_runtime_args(parser: argparse.ArgumentParser, precision: bool = True, runtimes: bool = False) -> None:
    """``--device``, (optionally) ``--precision`` and (optionally) ``--runtime``/``--int8``/``--calib-data``."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", help="torch device (default: the first GPU if there is one, else cpu)")
    if precision:
        group.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                           help="bf16/fp16: low-precision inference, faster on CPUs with AMX/AVX512-BF16 "
                                "and on GPUs (default fp32)")
    if runtimes:
        group.add_argument("--runtime", choices=RUNTIMES, default="torch",
                           help="torch, or openvino / onnxruntime on the CPU (same preprocessing and outputs)")
        group.add_argument("--int8", action="store_true",
                           help="post-training int8 quantization (openvino: NNCF, onnxruntime: quantize_static)")
        group.add_argument("--calib-data", metavar="DIR", help="images that calibrate --int8 (up to 300 are read)")


def check_img_size(value: int | None) -> None:
    check_range("--img-size", value, 1, MAX_IMG)


def model_source(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of :func:`t2t_vit.inference.load` that :func:`add_model_args` collected."""
    check_img_size(args.img_size)
    return dict(checkpoint=args.checkpoint, model=args.model, pretrained=args.pretrained,
                use_ema=WEIGHTS[args.weights], img_size=args.img_size, stem=args.stem)


def load_inference(args: argparse.Namespace, device: str | None = None) -> Inference:
    """The model the arguments describe, on ``device`` (else ``--device``), at ``--precision``."""
    return load(**model_source(args), device=device or getattr(args, "device", None),
                precision=getattr(args, "precision", "fp32"), **runtime_options(args))


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """``runtime``, ``int8`` and ``calib_data`` from :func:`add_runtime_args` (defaults when absent)."""
    return dict(runtime=getattr(args, "runtime", "torch"), int8=getattr(args, "int8", False),
                calib_data=getattr(args, "calib_data", None))

"""Benchmarks against what a user would run instead (also `t2t-vit bench`).

One run times, for each T2T-ViT model, the paper's formulation in fp32 and under bf16 autocast,
our defaults in fp32, our explicit bf16 inference model, the model under ONNX Runtime and
(opt-in) ``torch.compile``; beside the first model, timm's ``deit_small_patch16_224`` and
``resnet50`` in fp32, under bf16 autocast, with bf16 weights (inference) and in the compiled and
runtime modes asked for (see :mod:`t2t_vit.bench.cases`). The cases of one
(task, batch) are timed in alternation after a warm-up and medians reported; each row has its
compute floor (counted FLOPs / measured matmul rate), the attention kernel it ran and, in the full
suite, a ``torch.profiler`` breakdown naming what bounds it. ``--quick`` is the short look (fewer
cases and rounds, progress on every case and round; run times in docs/benchmarks.md); ``--gpu`` the
GPU preset (large batches, every mode compiled, peak memory from ``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from t2t_vit.bench.cases import (
    AGREEMENT_MODEL, COMPILE_BATCH, DEFAULT_MODELS, DEFAULT_MODES, GPU_MODELS, GPU_TASKS, MODELS,
    MODES, OTHERS, QUICK_MODELS, QUICK_MODES, build_case, build_other, kernel_summary, make_step,
    reference_formulation,
)
from t2t_vit.bench.measure import forward_flops, matmul_rate, profile_bound, time_alternating, training_memory
from t2t_vit.bench.suite import bench_model, check_targets, comparison_table, format_table, run_suite
from t2t_vit.errors import T2TViTError

__all__ = [
    "MODELS", "MODES", "OTHERS", "bench_model", "build_case", "build_other", "check_targets", "comparison_table",
    "format_table", "forward_flops",
    "kernel_summary", "make_step", "matmul_rate", "profile_bound", "reference_formulation", "run_suite",
    "time_alternating", "training_memory",
]
FULL_TASKS = (("infer", 1), ("infer", 8), ("infer", 32), ("train", 8))
# --runtime NAME adds these modes (each runtime case is timed in its own process)
RUNTIME_GROUPS = {"torch": (), "openvino": ("openvino", "openvino-bf16", "openvino-int8"),
                  "onnxruntime": ("onnx", "onnx-int8")}
QUICK_TASKS = (("infer", 8), ("train", 8))
QUICK_OTHERS = ("deit_small_patch16_224",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK_MODELS)} in modes {' '.join(QUICK_MODES)} beside {' '.join(QUICK_OTHERS)}, "
                        "infer:8 and train:8, 3 repeats, no memory, profile or agreement (about a minute)")
    parser.add_argument("--gpu", action="store_true",
                        help=f"the GPU preset on cuda: {', '.join(GPU_MODELS)}, inference at batch 256 and training at "
                        "64/128/256, every mode (compiled ones too), GPU peak memory")
    parser.add_argument("--models", nargs="+", choices=MODELS, help=f"T2T-ViT models (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help=f"default: {' '.join(DEFAULT_MODES)} (--gpu: all but onnx); reference is always added")
    parser.add_argument("--runtime", nargs="+", choices=list(RUNTIME_GROUPS), default=[],
                        help="also time the models on these runtimes: openvino (f32, bf16, int8), onnxruntime "
                        "(fp32, int8); inference on the CPU, each case in its own process")
    parser.add_argument("--others", nargs="*", choices=OTHERS, default=None,
                        help=f"timm models timed beside the first model (default: {' '.join(OTHERS)}, quick: "
                        f"{' '.join(QUICK_OTHERS)}; none: --others alone)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5, quick 3, gpu 5)")
    parser.add_argument("--compile-models", nargs="*", default=None, choices=MODELS,
                        help=f"models also measured compiled when a compile mode is asked for (default: every "
                        f"model benchmarked; at batch {COMPILE_BATCH}, --gpu: every batch)")
    parser.add_argument("--agreement-steps", type=int, default=None,
                        help=f"train {AGREEMENT_MODEL} this many steps on digits, then bf16-vs-fp32 top-1 agreement "
                        "on the held-out 20%% (default 120, quick and gpu 0 = skip)")
    parser.add_argument("--tasks", nargs="+", type=_task, default=None, metavar="TASK:BATCH",
                        help="e.g. train:64 infer:256 (default: " + " ".join(f"{t}:{b}" for t, b in FULL_TASKS)
                        + "; quick: " + " ".join(f"{t}:{b}" for t, b in QUICK_TASKS)
                        + "; gpu: " + " ".join(f"{t}:{b}" for t, b in GPU_TASKS) + ")")
    parser.add_argument("--img-size", type=int, default=224, help="input size of every model (default 224)")
    parser.add_argument("--no-memory", action="store_true", help="skip the training-memory subprocesses (CPU)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown of each case")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default cpu; --gpu: cuda)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results as JSON to PATH (default: print only)")


def _preset(args: argparse.Namespace) -> dict:
    """Models, modes, tasks, repeats and the optional parts for the chosen preset and overrides."""
    if args.gpu:
        preset = dict(models=GPU_MODELS, modes=[m for m in MODES if m != "onnx"], tasks=GPU_TASKS, repeats=5,
                      memory=False, profile=False, agreement=0, others=OTHERS)
    elif args.quick:
        preset = dict(models=QUICK_MODELS, modes=QUICK_MODES, tasks=QUICK_TASKS, repeats=3, memory=False,
                      profile=False, agreement=0, others=QUICK_OTHERS)
    else:
        preset = dict(models=DEFAULT_MODELS, modes=DEFAULT_MODES, tasks=FULL_TASKS, repeats=5, memory=True,
                      profile=True, agreement=120, others=OTHERS)
    modes = ["reference", *(m for m in args.modes or preset["modes"] if m != "reference")]
    modes += [m for r in getattr(args, "runtime", ()) for m in RUNTIME_GROUPS[r] if m not in modes]
    # a compile mode asked for compiles the models asked for (a smaller demo default hid them)
    compile_models = args.compile_models if args.compile_models is not None else (args.models or preset["models"])
    return dict(models=args.models or preset["models"], modes=modes, tasks=list(args.tasks or preset["tasks"]),
                repeats=args.repeats or preset["repeats"], memory_batch=8 if preset["memory"] and not args.no_memory else None,
                compile_models=compile_models, compile_batches=None if args.gpu else (COMPILE_BATCH,),
                agreement_steps=preset["agreement"] if args.agreement_steps is None else args.agreement_steps,
                others=preset["others"] if args.others is None else args.others,
                profile=preset["profile"] and not args.no_profile, img_size=args.img_size)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise T2TViTError(f"{'--gpu' if args.gpu else '--device cuda'} was given but no CUDA device is available")
    result = run_suite(device=device, log=lambda s: print(s, flush=True), **_preset(args))
    print(format_table(result))
    print()
    print(comparison_table(result))
    for target in result["targets"]:
        print(f"{'met' if target['met'] else 'MISSED'}: {target['target']}: {target['measured']:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
        print(f"wrote {args.json}")
    return 0


def _task(text: str) -> tuple[str, int]:
    task, _, batch = text.partition(":")
    if task not in ("infer", "train") or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not TASK:BATCH with TASK infer or train, e.g. train:64")
    return task, int(batch)


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark against the paper's formulation, DeiT-S, ResNet-50 and ONNX Runtime")
    add_arguments(parser)
    parser.set_defaults(func=run)

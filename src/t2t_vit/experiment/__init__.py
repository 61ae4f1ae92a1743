"""`t2t-vit experiment ablation`: the paper's two claims, in miniature, on real images.

Claim 1 (Table 7): the T2T module beats a plain patch split when training from scratch.
Claim 2 (Tables 6, 7): a deep-narrow backbone beats a shallow-wide one at a similar budget.

Seven arms are trained from scratch at 32 px with one shared recipe, over several seeds:

==============  ===========================================================================
t2t             T2T-ViT: performer T2T module, ``stem="small"`` (32 → 8×8 = 64 tokens), deep-narrow
t2tt            T2T-ViTt: the same with the exact-softmax transformer T2T layers (the paper's other variant)
no_t2t          the same backbone, T2T module replaced by a 4×4 patch split (also 64 tokens)
t2t_conv        T2T-ViTc: the T2T module replaced by convolutions with the same kernels/strides
shallow_wide    the T2T-ViT with 2× width and 3.5× fewer blocks (the paper's d768-4 vs 384-14)
vit             timm's VisionTransformer (learned positions, MLP ratio 4), 4×4 patches, similar size
resnet          timm's ResNet-10-T with narrower channels, similar size (CNN reference)
==============  ===========================================================================

An arm may carry options, ``ARM:key=value:...`` (``arms.OPTIONS``): Performer random features
(``kernel_ratio``), T2T dropout (``t2t_drop``), the T2T module's lr multiplier and warm-up
(``t2t_lr``, ``t2t_warmup``), and the arm's ``epochs``/``lr``/``warmup``/``drop_path``.

Equal training budget means: the same training split, the same number of epochs and the same
batch size — hence the same number of optimizer steps and training images seen — with the same
optimizer, schedule, augmentation and regularisation. Compute per step is *not* equalised; forward
MACs and wall-clock training time are reported beside every result.

Each arm/seed trains into ``DIR/runs/ARM/BUDGET/seedS``, ``BUDGET`` naming the run's training budget
(epochs, batch, max steps and a hash of the whole recipe): a finished run is reused only for the very
same budget, an interrupted one resumes from its last checkpoint (``resume="auto"``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from t2t_vit.errors import T2TViTError
from t2t_vit.experiment.arms import (IMG_SIZE, OPTIONS, PRESETS, Arm, Preset, ablation_arms, build_arm_model,
                                     profile_arm, select_arms)
from t2t_vit.experiment.report import SPREAD_LIMIT, markdown_table, summarize, write_outputs
from t2t_vit.experiment.runner import builtin_data, is_main_process, preset_recipe, run_arm

__all__ = ["IMG_SIZE", "OPTIONS", "PRESETS", "SPREAD_LIMIT", "Arm", "Preset", "T2TViTError", "ablation_arms",
           "build_arm_model", "markdown_table", "profile_arm", "register", "run_ablation", "select_arms",
           "summarize", "write_outputs"]


def run_ablation(
    data: str,
    output: str | Path,
    preset: str = "digits",
    seeds: int | list[int] = 3,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    arms: list[str] | None = None,
    workers: int = 0,
    max_steps: int | None = None,
    train_fn: Callable | None = None,
    log: Callable[[str], None] = print,
    train: bool = True,
    report: str = "ablation",
) -> dict[str, Any] | None:
    """Train every arm × seed (resumably) and write ``REPORT.{md,json,png}`` into ``output``.

    ``seeds``: a count N (seeds 0..N-1) or the list of seeds to run (e.g. to share seeds out among
    processes). Seeds run in the outer loop, so an interrupted experiment has every arm at some seeds. With
    ``train=False`` nothing trains: the report covers the finished runs of the requested budget.
    Returns the summary on rank 0, None on other ranks (which only take part in training).
    """
    if preset not in PRESETS:
        raise T2TViTError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or min(seed_list) < 0:
        raise T2TViTError(f"--seeds must be a count of at least 1 or a list of seeds >= 0, got {seeds}")
    if not report or Path(report).name != report or report in (".", ".."):
        raise T2TViTError(f"--report takes a file name stem such as 'ablation', got {report!r}")
    p, output = PRESETS[preset], Path(output)
    chosen = select_arms(ablation_arms(p), arms)
    shared, t2t_kwargs = preset_recipe(p)
    recipe = dict(dict(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr), **shared)
    recipe.update({k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr).items() if v is not None})
    train_data, data_settings = builtin_data(data, output)
    recipe.update(data_settings, data=train_data, workers=workers, max_steps=max_steps)
    if train_fn is None:
        from t2t_vit.train import train as train_fn
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in seed_list:
        for arm in chosen:
            m = run_arm(arm, seed, output, recipe, train_fn, t2t_kwargs, train=train, data_name=data)
            if m is None:
                continue
            log(f"[ablation] {arm.name} seed {seed}: top-1 {m['val_top1']:.2f}%"
                + (" (done before)" if m["skipped"] else "") + f"  {m['run_dir']}")
            results.setdefault(arm.name, []).append({"seed": seed, **m})
    if not is_main_process():
        return None
    if not results:
        raise T2TViTError(f"no finished run of this budget in {output}; run the command without --report-only first")
    summary = summarize(chosen, results, dict(recipe, data=data), preset, profile_arm)
    paths = write_outputs(summary, output, report)
    log(paths["md"].read_text())
    log("[ablation] wrote " + ", ".join(str(v) for v in paths.values()))
    return summary


# ---- command line ------------------------------------------------------------------------------

def _cmd_ablation(args: argparse.Namespace) -> int:
    preset = args.preset or ("digits" if args.data in ("digits", "photos") else "cifar")
    arms = [a for a in args.arms.split(",") if a.strip()] if args.arms else None
    run_ablation(args.data, args.output, preset=preset, seeds=_seeds(args.seeds), epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, arms=arms, workers=args.workers, max_steps=args.max_steps,
                 train=not args.report_only, report=args.report)
    return 0


def _seeds(text: str) -> int | list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()] if "," in text else int(text)
    except ValueError as err:
        raise T2TViTError(f"--seeds takes a count (3) or a list of seeds (0,2), got {text!r}") from err


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `t2t-vit experiment ablation`."""
    parser = subparsers.add_parser("experiment", help="reproduce the paper's claims at small scale")
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = sub.add_parser("ablation", help="T2T module and deep-narrow ablations against ViT and ResNet baselines",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True,
                   help="'digits' or 'photos' (built in), an ImageFolder root or a CIFAR folder")
    p.add_argument("--output", required=True, help="directory for runs/ and REPORT.{md,json,png}")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="arm sizes and recipe (default: digits for --data digits/photos, cifar otherwise)")
    p.add_argument("--seeds", default="3",
                   help="number of seeds per arm, N for seeds 0..N-1, or a list such as 1,2 (default: 3)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--arms", default=None,
                   help="comma-separated arms of t2t,t2tt,no_t2t,t2t_conv,shallow_wide,vit,resnet, each optionally "
                        "with options ARM:key=value:... where key is one of " + ", ".join(OPTIONS)
                        + " (e.g. t2t:kernel_ratio=2,t2t:t2t_drop=0,t2tt,no_t2t)")
    p.add_argument("--workers", type=int, default=0, help="data-loading workers")
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (smoke tests)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the finished runs of the requested budget")
    p.add_argument("--report", default="ablation", help="file stem of the report (default: ablation)")
    p.set_defaults(func=_cmd_ablation)

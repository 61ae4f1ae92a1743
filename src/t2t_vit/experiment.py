"""`t2t-vit experiment ablation`: the paper's two claims, in miniature, on real images.

Claim 1 (Table 7): the T2T module beats a plain patch split when training from scratch.
Claim 2 (Tables 6, 7): a deep-narrow backbone beats a shallow-wide one at a similar budget.

Six arms are trained from scratch at 32 px with one shared recipe, over several seeds:

==============  ===========================================================================
t2t             T2T-ViT: performer T2T module, ``stem="small"`` (32 → 8×8 = 64 tokens), deep-narrow
no_t2t          the same backbone, T2T module replaced by a 4×4 patch split (also 64 tokens)
t2t_conv        T2T-ViTc: the T2T module replaced by convolutions with the same kernels/strides
shallow_wide    the T2T-ViT with 2× width and 3.5× fewer blocks (the paper's d768-4 vs 384-14)
vit             timm's VisionTransformer (learned positions, MLP ratio 4), 4×4 patches, similar size
resnet          timm's ResNet-10-T with narrower channels, similar size (CNN reference)
==============  ===========================================================================

Equal training budget means: the same training split, the same number of epochs and the same
batch size — hence the same number of optimizer steps and training images seen — with the same
optimizer, schedule, augmentation and regularisation (the trainer's defaults). Compute per step is
*not* equalised; forward MACs and wall-clock training time are reported beside every result.

Each arm/seed trains into ``DIR/runs/ARM/seedS``; a run whose ``metrics.json`` exists is never
re-run, an interrupted one resumes from its last checkpoint (``resume="auto"``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from t2t_vit.errors import T2TViTError
from t2t_vit.profile import count_macs

IMG_SIZE = 32


@dataclass(frozen=True)
class Arm:
    """One model of the ablation: a model name and the keyword arguments that shape it."""

    name: str
    label: str
    model: str
    model_kwargs: dict[str, Any]
    role: str

    @property
    def is_t2t(self) -> bool:
        from t2t_vit.variants import VARIANTS

        return self.model in VARIANTS


@dataclass(frozen=True)
class Preset:
    """Arm widths and the shared recipe. ``width`` is the T2T-ViT's embedding width."""

    width: int
    depth: int
    token_dim: int
    epochs: int
    batch_size: int
    lr: float
    resnet_channels: tuple[int, ...]
    description: str


PRESETS: dict[str, Preset] = {
    # Sized so that 6 arms × 3 seeds fit in 30 minutes on a 2-core CPU (docs/experiments.md).
    "digits": Preset(64, 7, 32, 10, 32, 1e-3, (16, 32, 64, 128), "≈0.3M-param arms for the 2-core CPU digits run"),
    # T2T-ViT-7 widths (≈1M-params arms at 32 px): for CIFAR-sized folders on a GPU.
    "cifar": Preset(256, 7, 64, 100, 128, 1e-3, (32, 64, 128, 256), "T2T-ViT-7-wide arms for CIFAR-sized data on a GPU"),
}


def ablation_arms(preset: Preset) -> list[Arm]:
    """The six arms for a preset; every T2T-ViT arm shares depth/width/heads except shallow_wide."""
    d, depth, tdim = preset.width, preset.depth, preset.token_dim
    heads = max(1, d // 32)  # head width 32 everywhere
    backbone = dict(embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=2.0, token_dim=tdim)
    # Paper Table 7: d768-4 vs d384-14, i.e. 2× width and 3.5× fewer blocks at a similar parameter count.
    wide = dict(backbone, embed_dim=2 * d, depth=max(1, round(depth / 3.5)), num_heads=2 * heads)
    # A DeiT-shaped ViT (MLP ratio 4, qkv bias, learned positions) with as many blocks as match the params.
    vit_depth = max(1, round(depth * 8 / 12))
    vit = dict(img_size=IMG_SIZE, patch_size=4, embed_dim=d, depth=vit_depth, num_heads=heads)
    c = preset.resnet_channels
    resnet = dict(channels=c, stem_width=c[0])
    return [
        Arm("t2t", "T2T-ViT", "t2t_vit_7", dict(backbone, tokenizer="performer"), "T2T module, deep-narrow"),
        Arm("no_t2t", "T2T-ViT w/o T2T (patch 4)", "t2t_vit_7", dict(backbone, tokenizer="patch", patch_size=4),
            "claim 1: plain patch split"),
        Arm("t2t_conv", "T2T-ViTc (conv tokens)", "t2t_vit_7", dict(backbone, tokenizer="conv"),
            "T2T module replaced by convolutions"),
        Arm("shallow_wide", f"T2T-ViT shallow-wide (d{2 * d}-{wide['depth']})", "t2t_vit_7",
            dict(wide, tokenizer="performer"), "claim 2: shallow-wide backbone"),
        Arm("vit", f"ViT (timm, d{d}-{vit_depth}, patch 4)", "vit_tiny_patch16_224", vit, "ViT of similar size"),
        Arm("resnet", "ResNet-10-T (timm, narrow)", "resnet10t", resnet, "CNN reference"),
    ]


def build_arm_model(arm: Arm, num_classes: int, img_size: int = IMG_SIZE):
    """The very model the trainer builds for ``arm`` (its own factory), for params/MACs."""
    from t2t_vit.train import TrainConfig
    from t2t_vit.train.recipe import build_model

    cfg = TrainConfig(model=arm.model, model_kwargs=dict(arm.model_kwargs), img_size=img_size, stem="small")
    return build_model(cfg, num_classes)


def run_num_classes(out: Path) -> int | None:
    """Classifier width of a finished run, from its checkpoint's metadata (the data set decides it)."""
    from t2t_vit.checkpoint import read_metadata

    for name in ("checkpoint-last.safetensors", "checkpoint-best.safetensors"):
        if (out / name).exists():
            value = read_metadata(str(out / name)).get("num_classes")
            return int(value) if value else None
    return None


def profile_arm(arm: Arm, num_classes: int) -> dict[str, int]:
    model = build_arm_model(arm, num_classes)
    params = sum(p.numel() for p in model.parameters())
    macs, _ = count_macs(model, (3, IMG_SIZE, IMG_SIZE))
    return dict(params=params, macs=int(macs))


# ---- running ---------------------------------------------------------------------------------

def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the only process that writes the experiment's own files."""
    return int(os.environ.get("RANK", "0")) == 0


def run_dir(output: Path, arm: Arm, seed: int) -> Path:
    return output / "runs" / arm.name / f"seed{seed}"


def load_metrics(path: Path) -> dict[str, Any] | None:
    metrics = path / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def run_arm(arm: Arm, seed: int, output: Path, recipe: dict[str, Any], train_fn: Callable) -> dict[str, Any]:
    """Train one arm/seed unless its metrics.json exists; returns its metrics (plus wall time)."""
    from t2t_vit.train import TrainConfig

    out = run_dir(output, arm, seed)
    done = load_metrics(out)
    if done is not None:
        return {**done, "num_classes": run_num_classes(out), "skipped": True}
    # The trainer uses ``stem`` for T2T-ViT models only; timm models get their size via model_kwargs.
    cfg = TrainConfig(model=arm.model, model_kwargs=dict(arm.model_kwargs), img_size=IMG_SIZE, stem="small",
                      output=str(out), seed=seed, resume="auto", **recipe)
    start = time.perf_counter()
    metrics = dict(train_fn(cfg))
    metrics.setdefault("wall_time_s", time.perf_counter() - start)
    return {**metrics, "num_classes": run_num_classes(out), "skipped": False}


def run_ablation(
    data: str,
    output: str | Path,
    preset: str = "digits",
    seeds: int = 3,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    arms: list[str] | None = None,
    workers: int = 0,
    max_steps: int | None = None,
    train_fn: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Train every arm × seed (resumably) and write ablation.{md,json,png} into ``output``.

    Returns the summary on rank 0, None on other ranks (which only take part in training).
    """
    if preset not in PRESETS:
        raise T2TViTError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if seeds < 1:
        raise T2TViTError(f"--seeds must be at least 1, got {seeds}")
    p = PRESETS[preset]
    chosen = select_arms(ablation_arms(p), arms)
    recipe = dict(data=data, epochs=epochs or p.epochs, batch_size=batch_size or p.batch_size, lr=lr or p.lr,
                  workers=workers)
    if max_steps is not None:
        recipe["max_steps"] = max_steps
    if train_fn is None:
        from t2t_vit.train import train as train_fn
    output = Path(output)
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in chosen:
        for seed in range(seeds):
            log(f"[ablation] {arm.name} seed {seed}: {run_dir(output, arm, seed)}")
            m = run_arm(arm, seed, output, recipe, train_fn)
            log(f"[ablation] {arm.name} seed {seed}: top-1 {m['val_top1']:.2f}%" + (" (done before)" if m["skipped"] else ""))
            results.setdefault(arm.name, []).append({"seed": seed, **m})
    if not is_main_process():
        return None
    summary = summarize(chosen, results, recipe, preset, profile_arm)
    paths = write_outputs(summary, output)
    log(paths["md"].read_text())
    log("[ablation] wrote " + ", ".join(str(v) for v in paths.values()))
    return summary


def select_arms(all_arms: list[Arm], names: list[str] | None) -> list[Arm]:
    if not names:
        return all_arms
    by_name = {a.name: a for a in all_arms}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise T2TViTError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    return [by_name[n] for n in names]


# ---- summary and outputs -----------------------------------------------------------------------

CLAIMS = [
    ("T2T module vs plain patch split (claim 1)", "t2t", "no_t2t"),
    ("T2T module vs convolutional tokens", "t2t", "t2t_conv"),
    ("deep-narrow vs shallow-wide (claim 2)", "t2t", "shallow_wide"),
    ("T2T-ViT vs ViT of similar size", "t2t", "vit"),
]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def train_time(metrics: dict[str, Any]) -> float | None:
    for key in ("train_seconds", "wall_time_s"):
        if metrics.get(key) is not None:
            return float(metrics[key])
    return None


def summarize(arms: list[Arm], results: dict[str, list[dict[str, Any]]], recipe: dict[str, Any], preset: str,
              profile: Callable[[Arm, int], dict[str, int]] = profile_arm) -> dict[str, Any]:
    """Per-arm mean ± std over seeds, params/MACs, and paired per-seed differences for each claim."""
    rows = []
    for arm in arms:
        runs = results[arm.name]
        top1 = [float(r["val_top1"]) for r in runs]
        times = [t for t in map(train_time, runs) if t is not None]
        num_classes = runs[0].get("num_classes")
        size = profile(arm, int(num_classes)) if num_classes else {"params": None, "macs": None}
        mean, std = mean_std(top1)
        rows.append(dict(asdict(arm), **size, top1_mean=mean, top1_std=std, top1=top1,
                         top5_mean=statistics.fmean(float(r.get("val_top5", math.nan)) for r in runs),
                         train_time_s_mean=statistics.fmean(times) if times else None,
                         seeds=[r["seed"] for r in runs]))
    by_name = {r["name"]: r for r in rows}
    claims = []
    for text, a, b in CLAIMS:
        if a in by_name and b in by_name:
            diffs = [x - y for x, y in zip(by_name[a]["top1"], by_name[b]["top1"])]
            mean, std = mean_std(diffs)
            claims.append(dict(claim=text, a=a, b=b, diff_mean=mean, diff_std=std,
                               wins=sum(d > 0 for d in diffs), n=len(diffs)))
    return dict(experiment="ablation", preset=preset, img_size=IMG_SIZE, recipe=recipe, budget=BUDGET,
                arms=rows, claims=claims)


BUDGET = ("equal training budget = same training split, epochs and batch size (so the same optimizer steps and "
          "images seen), same optimizer, schedule and augmentation; compute per step differs and is reported as MACs")


def _si(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def markdown_table(summary: dict[str, Any]) -> str:
    r = summary["recipe"]
    lines = [
        f"Ablation at {summary['img_size']} px on `{r['data']}`: preset `{summary['preset']}`, "
        f"{r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']:g}; "
        f"top-1 is mean ± sample std over {len(summary['arms'][0]['seeds'])} seed(s).",
        "",
        "| Arm | Top-1 (%) | Top-5 (%) | Params | MACs | Train time / run | Tests |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for a in summary["arms"]:
        t = a["train_time_s_mean"]
        lines.append(f"| {a['label']} | {a['top1_mean']:.2f} ± {a['top1_std']:.2f} | {a['top5_mean']:.2f} | "
                     f"{_si(a['params'])} | {_si(a['macs'])} | {'n/a' if t is None else f'{t:.0f} s'} | {a['role']} |")
    if summary["claims"]:
        lines += ["", "Paired per-seed differences in top-1 (points; positive = first arm better):", ""]
        for c in summary["claims"]:
            lines.append(f"- {c['claim']}: {c['diff_mean']:+.2f} ± {c['diff_std']:.2f} "
                         f"(`{c['a']}` better in {c['wins']}/{c['n']} seeds)")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict[str, Any], path: Path) -> None:
    """Mean top-1 per arm with ±std error bars and each seed as a dot; params/MACs under each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=100)
    xs = range(len(arms))
    ax.bar(xs, [a["top1_mean"] for a in arms], yerr=[a["top1_std"] for a in arms], capsize=5,
           color=["#4c72b0" if a["name"] == "t2t" else "#8fa8c8" for a in arms])
    for x, a in zip(xs, arms):
        ax.scatter([x] * len(a["top1"]), a["top1"], color="black", s=10, zorder=3)
    labels = [textwrap.fill(a["label"], 18) + f"\n{_si(a['params'])} params\n{_si(a['macs'])} MACs" for a in arms]
    ax.set_xticks(list(xs), labels, fontsize=7)
    low = min(min(a["top1"]) for a in arms)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("validation top-1 (%)")
    r = summary["recipe"]
    ax.set_title(f"{r['data']}, {summary['img_size']} px, {r['epochs']} epochs: mean ± std over seeds (dots)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(summary: dict[str, Any], output: Path) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = {"md": output / "ablation.md", "json": output / "ablation.json", "png": output / "ablation.png"}
    paths["md"].write_text(markdown_table(summary))
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    bar_chart(summary, paths["png"])
    return paths


# ---- command line ------------------------------------------------------------------------------

def _cmd_ablation(args: argparse.Namespace) -> int:
    preset = args.preset or ("digits" if args.data == "digits" else "cifar")
    arms = [a for a in args.arms.split(",") if a] if args.arms else None
    run_ablation(args.data, args.output, preset=preset, seeds=args.seeds, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, arms=arms, workers=args.workers, max_steps=args.max_steps)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `t2t-vit experiment ablation`."""
    parser = subparsers.add_parser("experiment", help="reproduce the paper's claims at small scale")
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = sub.add_parser("ablation", help="T2T module and deep-narrow ablations against ViT and ResNet baselines",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="'digits' (built in), an ImageFolder root or a CIFAR folder")
    p.add_argument("--output", required=True, help="directory for runs/ and ablation.{md,json,png}")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="arm sizes and recipe (default: digits for --data digits, cifar otherwise)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per arm (0..N-1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--arms", default=None, help="comma-separated subset of: t2t,no_t2t,t2t_conv,shallow_wide,vit,resnet")
    p.add_argument("--workers", type=int, default=0, help="data-loading workers")
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (smoke tests)")
    p.set_defaults(func=_cmd_ablation)

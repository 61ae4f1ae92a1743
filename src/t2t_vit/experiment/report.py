"""The ablation's summary: per-arm mean ± std and seed spread, paired claims, table, JSON and chart."""
from __future__ import annotations

import json
import math
import statistics
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from t2t_vit.experiment.arms import IMG_SIZE, Arm, profile_arm

SPREAD_LIMIT = 3.0  # points of top-1 between the best and the worst seed; wider is flagged

CLAIMS = [
    ("T2T module vs plain patch split (claim 1)", "t2t", "no_t2t"),
    ("T2T module vs convolutional tokens", "t2t", "t2t_conv"),
    ("deep-narrow vs shallow-wide (claim 2)", "t2t", "shallow_wide"),
    ("T2T-ViT vs ViT of similar size", "t2t", "vit"),
]

BUDGET = ("equal training budget = same training split, epochs and batch size (so the same optimizer steps and "
          "images seen), same optimizer, schedule and augmentation; compute per step differs and is reported as MACs")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def train_time(metrics: dict[str, Any]) -> float | None:
    for key in ("train_seconds", "wall_time_s"):
        if metrics.get(key) is not None:
            return float(metrics[key])
    return None


def arm_row(arm: Arm, runs: list[dict[str, Any]], profile: Callable[[Arm, int], dict[str, int]]) -> dict[str, Any]:
    top1 = [float(r["val_top1"]) for r in runs]
    times = [t for t in map(train_time, runs) if t is not None]
    cpus = [float(r["cpu_time_s"]) for r in runs if r.get("cpu_time_s") is not None]
    num_classes = runs[0].get("num_classes")
    size = profile(arm, int(num_classes)) if num_classes else {"params": None, "macs": None}
    mean, std = mean_std(top1)
    spread = max(top1) - min(top1)
    return dict(asdict(arm), **size, has_t2t_module=arm.has_t2t_module, top1_mean=mean, top1_std=std, top1=top1,
                top1_spread=spread, unstable=len(top1) > 1 and spread > SPREAD_LIMIT,
                top5_mean=statistics.fmean(float(r.get("val_top5", math.nan)) for r in runs),
                train_time_s_mean=statistics.fmean(times) if times else None,
                cpu_time_s_mean=statistics.fmean(cpus) if cpus else None,
                steps=sorted({int(r["steps"]) for r in runs if r.get("steps") is not None}),
                seeds=[r["seed"] for r in runs])


def summarize(arms: list[Arm], results: dict[str, list[dict[str, Any]]], recipe: dict[str, Any], preset: str,
              profile: Callable[[Arm, int], dict[str, int]] = profile_arm) -> dict[str, Any]:
    """Per-arm mean ± std and spread over seeds, params/MACs, and paired per-seed differences: the
    paper's claims, and every other arm with a T2T module against the plain patch split."""
    rows = [arm_row(arm, results[arm.name], profile) for arm in arms if results.get(arm.name)]
    by_name = {r["name"]: r for r in rows}
    pairs = [c for c in CLAIMS if c[1] in by_name and c[2] in by_name]
    pairs += [(f"{a.label} vs plain patch split", a.name, "no_t2t") for a in arms
              if a.name != "t2t" and a.has_t2t_module and a.name in by_name and "no_t2t" in by_name]
    claims = []
    for text, a, b in pairs:
        seeds_b = dict(zip(by_name[b]["seeds"], by_name[b]["top1"]))
        diffs = [x - seeds_b[s] for s, x in zip(by_name[a]["seeds"], by_name[a]["top1"]) if s in seeds_b]
        if diffs:
            mean, std = mean_std(diffs)
            claims.append(dict(claim=text, a=a, b=b, diff_mean=mean, diff_std=std,
                               wins=sum(d > 0 for d in diffs), n=len(diffs)))
    return dict(experiment="ablation", preset=preset, img_size=IMG_SIZE, recipe=recipe, budget=BUDGET,
                spread_limit=SPREAD_LIMIT, arms=rows, claims=claims)


def _si(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _seconds(t: float | None) -> str:
    return "n/a" if t is None else f"{t:.0f} s"


def budget_text(recipe: dict[str, Any]) -> str:
    """The budget every arm trained with (an arm's own overrides show in its label)."""
    text = f"{recipe['epochs']} epochs of batch {recipe['batch_size']}, lr {recipe['lr']:g}"
    if recipe.get("max_steps"):
        text += f", stopped after at most {recipe['max_steps']} optimizer steps"
    return text


def markdown_table(summary: dict[str, Any]) -> str:
    r = summary["recipe"]
    seeds = max(len(a["seeds"]) for a in summary["arms"])
    lines = [
        f"Ablation at {summary['img_size']} px on `{r['data']}`: preset `{summary['preset']}`, {budget_text(r)}; "
        f"top-1 is mean ± sample std over {seeds} seed(s); spread = best − worst seed.",
        "",
        "| Arm | Top-1 (%) | Spread | Top-5 (%) | Steps | Params | MACs | Train time / run | CPU time / run | Tests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in summary["arms"]:
        t = a["train_time_s_mean"]
        flag = " ⚠" if a["unstable"] else ""
        steps = "/".join(str(s) for s in a["steps"]) or "n/a"
        lines.append(f"| {a['label']} | {a['top1_mean']:.2f} ± {a['top1_std']:.2f} | {a['top1_spread']:.1f}{flag} | "
                     f"{a['top5_mean']:.2f} | {steps} | {_si(a['params'])} | {_si(a['macs'])} | "
                     f"{_seconds(t)} | {_seconds(a['cpu_time_s_mean'])} | {a['role']} |")
    unstable = [a["label"] for a in summary["arms"] if a["unstable"]]
    if unstable:
        lines += ["", f"⚠ seed spread above {summary['spread_limit']:g} points (unstable across seeds): "
                  + ", ".join(unstable) + "."]
    short = [a["label"] for a in summary["arms"] if len(a["seeds"]) < seeds]
    if short:
        lines += ["", "Fewer seeds finished for: " + ", ".join(short) + "."]
    if summary["claims"]:
        lines += ["", "Paired per-seed differences in top-1 (points; positive = first arm better):", ""]
        for c in summary["claims"]:
            lines.append(f"- {c['claim']}: {c['diff_mean']:+.2f} ± {c['diff_std']:.2f} "
                         f"(`{c['a']}` better in {c['wins']}/{c['n']} seeds)")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict[str, Any], path: Path) -> None:
    """Mean top-1 per arm with ±std error bars and each seed as a dot; params/MACs under each bar."""
    from t2t_vit.plotting import pyplot, save_figure

    plt = pyplot()
    arms = summary["arms"]
    fig, ax = plt.subplots(figsize=(max(9, 1.4 * len(arms)), 4.8), dpi=100)
    xs = range(len(arms))
    colours = ["#c44e52" if a["unstable"] else "#4c72b0" if a["has_t2t_module"] else "#8fa8c8" for a in arms]
    ax.bar(xs, [a["top1_mean"] for a in arms], yerr=[a["top1_std"] for a in arms], capsize=5, color=colours)
    for x, a in zip(xs, arms):
        ax.scatter([x] * len(a["top1"]), a["top1"], color="black", s=10, zorder=3)
    labels = [textwrap.fill(a["label"], 18) + f"\n{_si(a['params'])} params\n{_si(a['macs'])} MACs" for a in arms]
    ax.set_xticks(list(xs), labels, fontsize=7)
    low = min(min(a["top1"]) for a in arms)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"{summary['recipe']['data']}, {summary['img_size']} px, {budget_text(summary['recipe'])}: "
                 f"mean ± std over seeds (dots); red = spread > {summary['spread_limit']:g} points", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(summary: dict[str, Any], output: Path, stem: str = "ablation") -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = {k: output / f"{stem}.{k}" for k in ("md", "json", "png")}
    paths["md"].write_text(markdown_table(summary))
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    bar_chart(summary, paths["png"])
    return paths

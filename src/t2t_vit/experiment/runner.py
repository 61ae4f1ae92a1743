"""Training every arm × seed through the real trainer, resumably, and only ever reusing a run whose
training budget is the one requested."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from t2t_vit.errors import T2TViTError
from t2t_vit.experiment.arms import IMG_SIZE, Arm, Preset

# TrainConfig fields that say where and how a run executes, not what it trains: not part of the budget.
RUN_FIELDS = ("output", "seed", "resume", "workers", "threads", "log_every", "device", "save_every_steps")
# Keys of a preset's recipe file that describe one model, not the shared training recipe.
MODEL_FIELDS = ("data", "model", "model_kwargs", "img_size", "stem", "output", "resume", "seed", "num_classes")
BUILTIN_SETS = ("photos",)
# TrainConfig fields that only concern a T2T module: a preset's recipe gives them to arms with one.
T2T_TRAIN_FIELDS = ("t2t_lr_scale", "t2t_warmup_epochs")


def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the only process that writes the experiment's own files."""
    return int(os.environ.get("RANK", "0")) == 0


def preset_recipe(preset: Preset) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared training keys, T2T-module settings) from the preset's recipe file, if any.

    The T2T-module settings are the ``t2t_*`` model arguments and the T2T module's own lr settings
    (``T2T_TRAIN_FIELDS``); only arms with a T2T module take them, so a small-data recipe that slows the
    T2T module's lr leaves the patch-split and other arms' training as it is."""
    if not preset.config:
        return {}, {}
    import yaml

    from t2t_vit.train.config import check_keys, recipe_path

    path = recipe_path(preset.config)
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    check_keys(values, path)
    t2t = {k: v for k, v in (values.get("model_kwargs") or {}).items() if k.startswith("t2t_")}
    t2t.update({k: v for k, v in values.items() if k in T2T_TRAIN_FIELDS})
    shared = {k: v for k, v in values.items() if k not in MODEL_FIELDS and k not in T2T_TRAIN_FIELDS}
    return shared, t2t


def builtin_data(data: str, output: Path) -> tuple[str, dict[str, Any]]:
    """``photos`` is written once as an ImageFolder under ``output/data`` (with its own statistics and
    no centre crop, as ``create_datasets("photos")`` uses), so every trainer version can read it."""
    if data.lower() not in BUILTIN_SETS:
        return data, {}
    from t2t_vit.data.arrays import channel_stats
    from t2t_vit.data.photos import photo_arrays, write_photo_folder

    folder = output / "data" / "photos"
    if not folder.is_dir():
        partial = output / "data" / f".photos-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        write_photo_folder(partial)
        os.replace(partial, folder)
    mean, std = channel_stats(photo_arrays()[0])
    return str(folder), dict(mean=[round(m, 6) for m in mean], std=[round(s, 6) for s in std], crop_pct=1.0)


def arm_config(arm: Arm, seed: int, recipe: dict[str, Any], t2t_kwargs: dict[str, Any], output: Path | None = None):
    """The TrainConfig of one arm/seed: the shared recipe, the preset's T2T arguments for arms with a T2T
    module, then the arm's own overrides."""
    from t2t_vit.train import TrainConfig

    kwargs, t2t_train = dict(arm.model_kwargs), {}
    if arm.has_t2t_module:  # the preset's T2T settings, under the arm's own options
        t2t_train = {k: v for k, v in t2t_kwargs.items() if k in T2T_TRAIN_FIELDS}
        kwargs = {**{k: v for k, v in t2t_kwargs.items() if k not in T2T_TRAIN_FIELDS}, **kwargs}
    # The trainer uses ``stem`` for T2T-ViT models only; timm models get their size via model_kwargs.
    return TrainConfig(**{**recipe, **t2t_train, **arm.train}, model=arm.model, model_kwargs=kwargs,
                       img_size=IMG_SIZE, stem="small", output=None if output is None else str(output),
                       seed=seed, resume="auto")


def budget_of(cfg, arm: Arm, data_name: str | None = None) -> dict[str, Any]:
    """Everything that decides what a run trains: the config minus where/how it runs.
    ``data_name`` replaces the data path of a built-in set written under the output directory."""
    budget = {k: v for k, v in cfg.to_dict().items() if k not in RUN_FIELDS}
    budget["data"] = data_name or budget["data"]
    return json.loads(json.dumps(budget, default=str))


def budget_tag(budget: dict[str, Any]) -> str:
    """A directory name for one budget: readable head (epochs, batch, max steps) + a hash of the rest."""
    digest = hashlib.sha1(json.dumps(budget, sort_keys=True).encode()).hexdigest()[:8]
    steps = f"-s{budget['max_steps']}" if budget.get("max_steps") else ""
    return f"e{budget['epochs']}-b{budget['batch_size']}{steps}-{digest}"


def run_dir(output: Path, arm: Arm, seed: int, budget: dict[str, Any]) -> Path:
    """``runs/FAMILY/BUDGET/seedS``: a variant whose settings equal another arm's shares its runs."""
    return output / "runs" / arm.family / budget_tag(budget) / f"seed{seed}"


def load_metrics(path: Path, budget: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a finished run trained with exactly ``budget``; None if unfinished."""
    metrics, saved = path / "metrics.json", path / "budget.json"
    if not metrics.exists():
        return None
    if not saved.exists() or json.loads(saved.read_text()) != budget:
        raise T2TViTError(f"{path} holds a run of another budget than requested; move it away or use another --output")
    return json.loads(metrics.read_text())


def run_num_classes(out: Path) -> int | None:
    """Classifier width of a finished run, from its checkpoint's metadata (the data set decides it)."""
    from t2t_vit.reading import read_metadata

    for name in ("checkpoint-last.safetensors", "checkpoint-best.safetensors"):
        if (out / name).exists():
            value = read_metadata(str(out / name)).get("num_classes")
            return int(value) if value else None
    return None


def run_arm(arm: Arm, seed: int, output: Path, recipe: dict[str, Any], train_fn: Callable,
            t2t_kwargs: dict[str, Any] | None = None, train: bool = True,
            data_name: str | None = None) -> dict[str, Any] | None:
    """Train one arm/seed unless a run of the same budget finished; returns its metrics (plus wall time),
    or None when ``train`` is False and it has not finished."""
    cfg = arm_config(arm, seed, recipe, t2t_kwargs or {})
    budget = budget_of(cfg, arm, data_name)
    out = run_dir(output, arm, seed, budget)
    done = load_metrics(out, budget)
    if done is not None:
        cpu = json.loads((out / "cpu.json").read_text()) if (out / "cpu.json").exists() else {}
        return {**done, **cpu, "num_classes": run_num_classes(out), "skipped": True, "run_dir": str(out)}
    if not train:
        return None
    cfg.output = str(out)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "budget.json").write_text(json.dumps(budget, indent=1, sort_keys=True) + "\n")
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = dict(train_fn(cfg))
    metrics.setdefault("wall_time_s", time.perf_counter() - start)
    # CPU seconds of this process (all threads): on a shared machine, what the run would take alone.
    metrics["cpu_time_s"] = round(time.process_time() - cpu_start, 1)
    if is_main_process():
        (out / "cpu.json").write_text(json.dumps({"cpu_time_s": metrics["cpu_time_s"]}) + "\n")
    return {**metrics, "num_classes": run_num_classes(out), "skipped": False, "run_dir": str(out)}

"""The training configuration: one dataclass with neutral defaults, YAML recipe files, command-line
overrides, validation.

Precedence: dataclass defaults < ``--config FILE`` < command-line flags. The dataclass describes no
particular experiment: a model name means that model as registered (its own input size and stem);
recipes such as ``configs/digits.yaml`` (the demo) set everything else. The resolved config is saved
as ``config.yaml`` in the output directory of every run.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from t2t_vit.data import BUILTIN
from t2t_vit.errors import T2TViTError, did_you_mean
from t2t_vit.modelsource import ModelSource
from t2t_vit.precision import PRECISIONS
from t2t_vit.train import checks, preempt
from t2t_vit.train.checks import MAX_BATCH_SIZE, MAX_LR, MAX_SEED, coerce, option, read_yaml


@dataclass
class TrainConfig:
    """Everything a training run needs; ``None`` means "the model's or the data set's own value".

    Each field's help text, sign, bounds, choices and whether a resumed run may change it are declared
    here, once (:func:`checks.option`): ``t2t-vit train --help``, the checks and resume all read them.
    """

    # ---- data and model -----------------------------------------------------------------
    data: str = option("digits", path=True,
                       help="'digits' (built in), an ImageFolder root with train/ and val/, a CIFAR-10/100 python "
                            "folder, hfds/<HF dataset folder or name> or wds/<WebDataset shard folder or pattern> "
                            "(docs/data.md)")
    model: str = option("t2t_vit_7", help="a T2T-ViT name (t2t-vit profile --all) or any timm model, built as "
                                          "registered (without --config and --model: the digits demo recipe)")
    model_kwargs: dict = option(factory=dict,
                                help="extra model arguments as YAML/JSON, e.g. '{embed_dim: 128, depth: 4}'")
    img_size: Any = option(None, help="input size: 32 or 224 or H,W (default: the model's registered size)")
    stem: str | None = option(None, help="T2T-ViT soft-split schedule: imagenet or small (default: the model's own)")
    num_classes: int | None = option(None, sign="positive", help="classifier width; none: the data set's class count")
    drop_path: float = option(0.0, sign="not negative", bounds=(0, 1), high_open=True,
                              help="stochastic depth rate; the paper's ImageNet recipes use 0.1")
    mean: list | None = option(None, help="normalisation mean per channel; none: the data set's")
    std: list | None = option(None, help="normalisation std per channel; none: the data set's")
    crop_pct: float | None = None
    interpolation: str = "bicubic"
    workers: int | None = option(None, free_on_resume=True, sign="not negative",
                                 help="loader processes (default: 0 for in-memory data sets, else up to 8; never "
                                      "more than the CPUs)")
    # ---- augmentation (augment=False turns every item below off, mixup and smoothing included).
    # None: the data set's default (t2t_vit.data.transforms.DATASET_AUGMENT: digits are never
    # flipped, others get timm's crop and flip); recipe files set the paper's values.
    augment: bool = option(True, help="--no-augment turns off random crops, flips, RandAugment, erasing, "
                                      "mixup/cutmix and smoothing")
    scale: list | None = None
    ratio: list | None = None
    hflip: float | None = None
    auto_augment: str | None = option(None, help="timm RandAugment spec; the paper's ImageNet recipes use "
                                                 "rand-m9-mstd0.5-inc1")
    re_prob: float = option(0.0, sign="not negative")
    color_jitter: float | None = option(None, help="colour jitter strength; none: off")
    train_interpolation: str = "bicubic"
    mixup: float = option(0.0, sign="not negative")
    cutmix: float = option(0.0, sign="not negative")
    mixup_switch_prob: float = 0.5
    smoothing: float = option(0.1, sign="not negative", bounds=(0, 1), high_open=True)
    # ---- optimisation ---------------------------------------------------------------------
    epochs: int = option(10, sign="positive")
    batch_size: int = option(32, sign="positive", at_most=MAX_BATCH_SIZE, help="images per process and micro-step")
    accum_steps: int = option(1, sign="positive")
    opt: str = option("adamw", choices=("adamw", "sgd", "adam", "lamb", "momentum"))
    lr: float = option(1e-3, sign="positive", bounds=(0, MAX_LR))
    min_lr: float = option(1e-5, sign="not negative", bounds=(0, MAX_LR))
    warmup_lr: float = option(1e-6, sign="not negative", bounds=(0, MAX_LR))
    warmup_epochs: float = option(1.0, sign="not negative")
    cooldown_epochs: float = option(0.0, sign="not negative")
    weight_decay: float = option(0.05, sign="not negative")
    momentum: float = option(0.9, sign="not negative")
    body_lr_scale: float = option(1.0, sign="not negative", help="lr of all but the classifier = lr × this (the "
                                                                 "paper's transfer recipe uses 0.01)")
    t2t_lr_scale: float = option(1.0, sign="not negative", help="lr of the tokenizer (T2T module) = its group's lr "
                                                                "× this (small-data studies)")
    t2t_warmup_epochs: float = option(0.0, sign="not negative", help="extra linear warm-up of the tokenizer's lr, "
                                                                     "in epochs, on top of the shared schedule")
    clip_grad: float | None = option(None, sign="positive")
    ema: bool = True
    ema_decay: float = option(0.9998, bounds=(0, 1), high_open=True)
    ema_warmup: bool = option(True, help="the EMA decay ramps up from 0, so short runs do not look broken")
    precision: str = option("fp32", choices=tuple(PRECISIONS))
    compile: bool = option(False, free_on_resume=True)
    grad_checkpointing: bool = option(False, free_on_resume=True)
    max_steps: int | None = option(None, free_on_resume=True, sign="positive",
                                   help="stop after this many optimizer steps")
    nonfinite_patience: int = option(3, free_on_resume=True, sign="positive",
                                     help="consecutive non-finite steps skipped before the run stops")
    # ---- transfer and distillation ---------------------------------------------------------
    finetune: str | None = option(None, free_on_resume=True, path=True,  # (or a parsed ModelSource)
                                  help="start from a checkpoint file, or from a pretrained tag such as t2t_vit_14.in1k")
    teacher: str | None = option(None, path=True, help="distillation teacher: one of our checkpoints, or a model "
                                                       "name (+ --teacher-checkpoint)")
    teacher_checkpoint: str | None = option(None, path=True)
    distill: str = option("soft", choices=("soft", "hard"))
    distill_alpha: float = option(0.5, bounds=(0, 1))
    distill_tau: float = option(1.0, sign="not negative")
    # ---- run management ---------------------------------------------------------------------
    output: str | None = option(None, free_on_resume=True, path=True,
                                help="run directory (default runs/<model>-<data>-<timestamp>)")
    resume: str | None = option(None, free_on_resume=True, path=True,
                                help="a checkpoint, a run directory, or 'auto' (the last checkpoint of --output)")
    seed: int = option(0, bounds=(0, MAX_SEED))
    deterministic: bool = option(False, free_on_resume=True)
    save_every_steps: int | None = option(None, free_on_resume=True, sign="positive")
    preempt_signals: str | None = option("TERM,USR1", help="signals (and always SIGINT) that stop the run after the "
                                                           "current step, save checkpoint-last and exit 128+signal "
                                                           "number (143 TERM, 138 USR1); 'none' for none")
    log_every: int = option(50, free_on_resume=True, sign="positive")
    device: str = option("auto", free_on_resume=True)
    threads: int | None = option(None, free_on_resume=True, sign="positive",
                                 help="torch CPU threads per process; none: the cores the loader workers leave")

    def validate(self) -> ValidConfig:
        """This config checked: a :class:`ValidConfig` built from a copy of its values (itself, when it
        is one already). ``self`` is left as it is."""
        if isinstance(self, ValidConfig):
            return self
        return ValidConfig(**copy.deepcopy({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}))

    def resolved_output(self) -> str:
        if self.output:
            return self.output
        data_name = self.data if self.data in BUILTIN else Path(self.data.rstrip("/")).name
        model_name = self.model.replace("/", "_")
        return os.path.join("runs", f"{model_name}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ValidConfig(TrainConfig):
    """A :class:`TrainConfig` that passed every check: what :func:`t2t_vit.train.engine.train` and the
    parts of a run work from.

    Validation happens exactly once, when a ValidConfig is built: ``TrainConfig.validate()``,
    :func:`load_config` (and so the command line) and ``dataclasses.replace(valid, ...)`` all build
    one; ``train`` validates a plain TrainConfig it is given and takes a ValidConfig as it is. Values
    are converted to their field's declared type, and ``img_size``/``stem`` left at None are filled in
    from the model's registration, so the saved config says what was trained. A ValidConfig is
    read-only, so it stays what was checked (its lists and mappings are not to be changed either).
    """

    finetune_source: ModelSource | None  # cfg.finetune parsed (file or pretrained tag); None without one
    teacher_source: ModelSource | None  # cfg.teacher parsed (file or model name); None without one

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cfg = TrainConfig(*args, **kwargs)
        finetune, teacher = _check(cfg)
        for f in dataclasses.fields(cfg):
            object.__setattr__(self, f.name, getattr(cfg, f.name))
        object.__setattr__(self, "finetune_source", finetune)
        object.__setattr__(self, "teacher_source", teacher)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(
            f"a validated TrainConfig is read-only (cannot set {name!r}); build a new one with "
            "dataclasses.replace(cfg, ...), which validates it")

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)


def _check(cfg: TrainConfig) -> tuple[ModelSource | None, ModelSource | None]:
    """Check every value of ``cfg`` before any work starts, converting and completing it in place;
    raise one clear T2TViTError on the first problem. Returns ``finetune`` and ``teacher`` parsed
    (``finetune`` may arrive parsed already: the command line parses it to choose the recipe)."""
    given = cfg.finetune if isinstance(cfg.finetune, ModelSource) else None
    if given is not None:
        cfg.finetune = given.text
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, coerce(f.name, FIELD_TYPES[f.name], getattr(cfg, f.name)))
    finetune = given or (ModelSource.parse(cfg.finetune) if cfg.finetune is not None else None)
    teacher = ModelSource.parse(cfg.teacher) if cfg.teacher else None
    checks.check_numbers(cfg)
    checks.check_paths(cfg, finetune)
    checks.check_model(cfg, finetune, teacher)
    preempt.parse_signals(cfg.preempt_signals)
    return finetune, teacher


# Settings a resumed run may take from the new command line (declared with free_on_resume=True): they
# change how the run is carried out, not what is trained. Every other field must equal the run's own
# (its config.yaml), since the schedule, the data order and the optimizer state saved in the checkpoint
# depend on it.
FREE_ON_RESUME = frozenset(f.name for f in dataclasses.fields(TrainConfig) if checks.rules(f).free_on_resume)

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES = checks.field_types(TrainConfig)
DEMO_RECIPE = "digits"  # what `t2t-vit train` with neither --config nor --model trains


def check_keys(values: dict[str, Any], source: str) -> None:
    """Refuse unknown keys, suggesting the closest valid one and listing them all."""
    for key in values:
        if key not in FIELDS:
            hint = did_you_mean(key, FIELDS, n=1, quote=True)
            raise T2TViTError(f"unknown config key {key!r} in {source}{hint}; valid keys: {', '.join(FIELDS)}")


def recipe_path(name_or_path: str) -> str:
    """A recipe file path: an existing file, or the bare name of a recipe shipped in ``t2t_vit/configs``.

    Anything that looks like a path (a folder separator or a YAML suffix) must exist: a typo in a path
    must not quietly train the shipped recipe of the same name.
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = resources.files("t2t_vit") / "configs" / (name_or_path + ".yaml")
    looks_like_path = any(sep and sep in name_or_path for sep in (os.sep, os.altsep, "/")) or \
        name_or_path.lower().endswith((".yml", ".yaml"))
    if not looks_like_path and shipped.is_file():
        return str(shipped)
    raise T2TViTError(f"config file {name_or_path!r} does not exist; shipped recipes (by bare name): "
                      f"{', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    folder = resources.files("t2t_vit") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_recipe(path: str) -> dict[str, Any]:
    """The mapping a recipe file holds (size-bounded YAML without aliases), keys checked."""
    path = recipe_path(path)
    try:
        with open(path, "rb") as f:
            text = f.read(checks.MAX_YAML_BYTES + 1)
    except OSError as err:
        raise T2TViTError(f"cannot read config file {path!r}: {err.strerror or err}") from err
    loaded = read_yaml(text, f"config file {path!r}")
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise T2TViTError(f"config file {path!r} must hold a mapping of keys to values")
    check_keys(loaded, path)
    return loaded


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> ValidConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated (once: pass the
    result to ``train`` as it is)."""
    values: dict[str, Any] = dict(read_recipe(path)) if path else {}
    if overrides:
        check_keys(overrides, "the overrides")
        values.update(overrides)
    values.pop("config", None)
    return ValidConfig(**values)

"""The training configuration: one dataclass, YAML recipe files, command-line overrides, validation.

Precedence: dataclass defaults < ``--config FILE`` < command-line flags. The resolved config is
saved as ``config.yaml`` in the output directory of every run.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from t2t_vit.errors import T2TViTError


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults: the digits demo (a small T2T-ViT-7, 32 px)."""

    # ---- data and model -----------------------------------------------------------------
    data: str = "digits"
    model: str = "t2t_vit_7"
    model_kwargs: dict = field(default_factory=lambda: dict(embed_dim=128, depth=3, num_heads=4, token_dim=16))
    img_size: Any = 32  # int or [height, width]
    stem: str = "small"
    num_classes: int | None = None  # None: from the data set
    drop_path: float = 0.0  # the paper (ImageNet recipes): 0.1
    mean: list | None = None  # None: the data set's / model's default
    std: list | None = None
    crop_pct: float | None = None
    interpolation: str = "bicubic"
    workers: int = 2
    # ---- augmentation (augment=False turns every item below off, mixup and smoothing included).
    # Defaults suit the small digits demo; the ImageNet recipe files set the paper's values.
    augment: bool = True
    scale: list = field(default_factory=lambda: [0.75, 1.0])
    ratio: list = field(default_factory=lambda: [0.9, 1.1])
    hflip: float = 0.0  # digits must not be mirrored; the ImageNet recipes set 0.5
    auto_augment: str | None = None  # ImageNet recipes: "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.0
    color_jitter: float | None = None
    train_interpolation: str = "bicubic"
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    # ---- optimisation ---------------------------------------------------------------------
    epochs: int = 10
    batch_size: int = 32  # per process
    accum_steps: int = 1
    opt: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1.0
    cooldown_epochs: float = 0.0
    weight_decay: float = 0.05
    momentum: float = 0.9
    body_lr_scale: float = 1.0  # lr of everything but the classifier = lr × this (transfer: 0.01)
    clip_grad: float | None = None
    ema: bool = True
    ema_decay: float = 0.998
    ema_warmup: bool = True  # decay ramps up from 0 so short runs do not look broken
    precision: str = "fp32"
    compile: bool = False
    grad_checkpointing: bool = False
    max_steps: int | None = None
    nonfinite_patience: int = 3  # consecutive non-finite steps skipped before the run stops
    # ---- transfer and distillation ---------------------------------------------------------
    finetune: str | None = None
    teacher: str | None = None  # a checkpoint path of ours, or a model name (+ teacher_checkpoint)
    teacher_checkpoint: str | None = None
    distill: str = "soft"
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    # ---- run management ---------------------------------------------------------------------
    output: str | None = None  # None: runs/<model>-<data>-<timestamp>
    resume: str | None = None  # a checkpoint path, a run directory, or "auto"
    seed: int = 0
    deterministic: bool = False
    save_every_steps: int | None = None
    log_every: int = 50
    device: str = "auto"
    threads: int | None = None  # torch CPU threads per process (None: cores left after the loader workers)

    def validate(self) -> "TrainConfig":
        """Check every value before any work starts; raise one clear T2TViTError on the first problem."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name)))
        positive = dict(lr=self.lr, batch_size=self.batch_size, epochs=self.epochs, accum_steps=self.accum_steps)
        for name, value in positive.items():
            if value is None or value <= 0:
                raise T2TViTError(f"{_flag(name)} must be positive, got {value}")
        for name in ("max_steps", "save_every_steps", "threads", "num_classes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise T2TViTError(f"{_flag(name)} must be positive, got {value}")
        for name in ("min_lr", "warmup_lr", "weight_decay", "warmup_epochs", "cooldown_epochs", "drop_path",
                     "smoothing", "mixup", "cutmix", "re_prob", "workers", "body_lr_scale", "distill_tau"):
            if getattr(self, name) < 0:
                raise T2TViTError(f"{_flag(name)} must not be negative, got {getattr(self, name)}")
        sizes = [self.img_size] if isinstance(self.img_size, int) else list(self.img_size or [])
        if len(sizes) not in (1, 2) or not all(isinstance(v, int) and v > 0 for v in sizes):
            raise T2TViTError(f"--img-size must be a positive int or H,W, got {self.img_size!r}")
        if not 0 <= self.drop_path < 1:
            raise T2TViTError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if not 0 <= self.distill_alpha <= 1:
            raise T2TViTError(f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        if not 0 <= self.ema_decay < 1:
            raise T2TViTError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise T2TViTError(f"--clip-grad must be positive, got {self.clip_grad}")
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("opt", self.opt, ("adamw", "sgd", "adam", "lamb", "momentum"))
        _choice("distill", self.distill, ("soft", "hard"))
        if not isinstance(self.model_kwargs, dict):
            raise T2TViTError(f"--model-kwargs must be a mapping, got {self.model_kwargs!r}")
        self._check_paths()
        self._check_model()
        return self

    def _check_paths(self) -> None:
        if self.data != "digits" and not os.path.exists(self.data):
            raise T2TViTError(f"data path {self.data!r} does not exist (use --data digits for the built-in demo data)")
        for name in ("finetune", "teacher_checkpoint"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise T2TViTError(f"{_flag(name)} file {path!r} does not exist")
        if self.resume not in (None, "auto") and not os.path.exists(self.resume):
            raise T2TViTError(f"--resume path {self.resume!r} does not exist (use --resume auto to pick up the last run)")

    def _check_model(self) -> None:
        import timm

        import t2t_vit

        if self.model in t2t_vit.list_models():
            from t2t_vit.model import to_2tuple_size
            from t2t_vit.t2t import resolve_stem, token_grid

            if self.model_kwargs.get("tokenizer", t2t_vit.VARIANTS[self.model].arch.get("tokenizer")) != "patch":
                token_grid(to_2tuple_size(self.img_size), resolve_stem(self.stem))
        elif not timm.is_model(self.model):
            close = difflib.get_close_matches(self.model, t2t_vit.list_models() + timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise T2TViTError(f"unknown model {self.model!r}{hint}")
        teacher = self.teacher
        if teacher and not os.path.exists(teacher) and teacher not in t2t_vit.list_models() and not timm.is_model(teacher):
            raise T2TViTError(f"--teacher {teacher!r} is neither an existing checkpoint file nor a known model name")

    def resolved_output(self) -> str:
        if self.output:
            return self.output
        data_name = "digits" if self.data == "digits" else Path(self.data.rstrip("/")).name
        return os.path.join("runs", f"{self.model}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Numbers written as YAML 1.1 leaves them ("2e-3" is a string there) or typed on the command line."""
    kind = str(f.type)
    if value is None or not isinstance(value, str) or "str" in kind:
        if "bool" in kind and not isinstance(value, bool) and value is not None:
            raise T2TViTError(f"{_flag(f.name)} must be true or false, got {value!r}")
        return value
    for number in (int, float):
        if number.__name__ in kind:
            try:
                return number(value) if number is float or value.strip().lstrip("-").isdigit() else number(value)
            except ValueError:
                continue
    if "int" in kind or "float" in kind:
        raise T2TViTError(f"{_flag(f.name)} must be a number, got {value!r}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise T2TViTError(f"{_flag(name)} must be one of {', '.join(choices)}, got {value!r}")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def check_keys(values: dict[str, Any], source: str) -> None:
    """Refuse unknown keys, suggesting the closest valid one and listing them all."""
    for key in values:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise T2TViTError(f"unknown config key {key!r} in {source}; {hint}valid keys: {', '.join(FIELDS)}")


def recipe_path(name_or_path: str) -> str:
    """A recipe file path: an existing file, or the name of a recipe shipped in ``t2t_vit/configs``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = resources.files("t2t_vit") / "configs" / (Path(name_or_path).stem + ".yaml")
    if shipped.is_file():
        return str(shipped)
    raise T2TViTError(f"config file {name_or_path!r} does not exist; shipped recipes: {', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    folder = resources.files("t2t_vit") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated."""
    values: dict[str, Any] = {}
    if path:
        path = recipe_path(path)
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise T2TViTError(f"config file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise T2TViTError(f"config file {path!r} must hold a mapping of keys to values")
        check_keys(loaded, path)
        values.update(loaded)
    if overrides:
        check_keys(overrides, "the overrides")
        values.update(overrides)
    values.pop("config", None)
    return TrainConfig(**values).validate()

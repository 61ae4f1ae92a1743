"""Checks a training configuration passes before any work starts: types coerced from the
dataclass's declared field types, finite numbers, each field's declared :class:`Rules` (sign, bounds,
choices), existing paths, a buildable model.

Every problem is one :class:`T2TViTError` sentence naming the flag.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from t2t_vit.data import BUILTIN
from t2t_vit.data.readers import is_reader_spec
from t2t_vit.errors import T2TViTError, did_you_mean
from t2t_vit.metadata import MAX_IMG
from t2t_vit.modelsource import ModelSource
from t2t_vit.table import is_t2t_vit

MAX_YAML_BYTES = 1 << 20  # a recipe is a few hundred bytes; anything near this is not a recipe
MAX_BATCH_SIZE = 1 << 16
MAX_LR = 10.0  # far above any recipe (SGD on ImageNet uses ~0.1-5); larger is a typo, not a schedule
MAX_SEED = 2**32 - 1  # NumPy's seed range


# ---- YAML: bounded size, no aliases (an alias bomb expands a few hundred bytes into gigabytes) ----
class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted here",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(text: str | bytes, source: str) -> Any:
    """``yaml.safe_load`` that refuses aliases and texts over ``MAX_YAML_BYTES``."""
    if len(text) > MAX_YAML_BYTES:
        raise T2TViTError(f"{source} is larger than {MAX_YAML_BYTES} bytes; a training recipe is far smaller")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise T2TViTError(f"{source} is not valid YAML: {' '.join(str(err).split())}") from err
    except RecursionError as err:  # thousands of nested brackets: the parser recurses once per level
        raise T2TViTError(f"{source} nests lists or mappings too deeply to be a training recipe") from err


# ---- types ------------------------------------------------------------------------------------------
def field_types(cls: type) -> dict[str, Any]:
    """Each field's declared type with ``None`` allowed or not: ``{name: (types, optional)}``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, hint in hints.items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
        out[name] = (kinds, type(None) in args)
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def coerce(name: str, spec: tuple[tuple[type, ...], bool], value: Any) -> Any:
    """``value`` as the field's type: numbers written as strings ("2e-3" is one in YAML 1.1, flags
    arrive as text) become numbers; a float with no fraction may stand for an int; anything else that
    does not fit is refused."""
    kinds, optional = spec
    if value is None:
        if optional or Any in kinds:
            return None
        raise T2TViTError(f"{flag(name)} needs a value")
    if Any in kinds or isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    for kind in kinds:
        converted = _convert(kind, value)
        if converted is not None:
            return converted
    wanted = " or ".join(_type_word(k) for k in kinds)
    raise T2TViTError(f"{flag(name)} must be {wanted}, got {value!r}")


def _convert(kind: type, value: Any) -> Any:
    if kind is bool or isinstance(value, bool):
        return None  # only true/false are booleans; 1 and "yes" are not silently turned into them
    if kind is float and isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            return None
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    if kind is list and isinstance(value, tuple):
        return list(value)
    return None


def _type_word(kind: type) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text", list: "a list",
            dict: "a mapping"}.get(kind, kind.__name__)


# ---- each field's rules: declared once on TrainConfig, read by these checks and by the CLI -----------------
@dataclass(frozen=True)
class Rules:
    """What a TrainConfig field means and which values it takes (``dataclasses.field`` metadata).

    ``help`` is its ``--help`` text; ``sign`` "positive" or "not negative" (None always passes where the
    field allows None); ``bounds`` ``(low, high)``, inclusive unless ``high_open``; ``at_most`` a plain
    upper limit; ``choices`` the accepted words; ``path`` a file-system path (must encode as UTF-8);
    ``free_on_resume`` a setting a resumed run may change (how the run is carried out, not what it trains).
    """

    help: str = ""
    sign: Literal["positive", "not negative"] | None = None
    bounds: tuple[float, float] | None = None
    high_open: bool = False
    at_most: int | None = None
    choices: tuple[str, ...] = ()
    path: bool = False
    free_on_resume: bool = False


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **declared: Any) -> Any:
    """A TrainConfig field with its :class:`Rules`: ``lr: float = option(1e-3, sign="positive", ...)``."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"rules": Rules(**declared)})


def rules(field: dataclasses.Field) -> Rules:
    return field.metadata.get("rules", Rules())


def check_numbers(cfg: Any) -> None:
    for name, value in vars(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise T2TViTError(f"{flag(name)} must be a finite number, got {value}")
    fields = [(f.name, rules(f), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    for name, rule, value in fields:
        if rule.sign == "positive" and value is not None and value <= 0:
            raise T2TViTError(f"{flag(name)} must be positive, got {value}")
        if rule.sign == "not negative" and value is not None and value < 0:
            raise T2TViTError(f"{flag(name)} must not be negative, got {value}")
    for name, rule, value in fields:
        if rule.at_most is not None and value is not None and value > rule.at_most:
            raise T2TViTError(f"{flag(name)} must be at most {rule.at_most}, got {value}")
    _check_img_size(cfg.img_size)
    for name, rule, value in fields:
        if rule.bounds is not None and value is not None:
            low, high = rule.bounds
            if not (low <= value < high if rule.high_open else low <= value <= high):
                raise T2TViTError(f"{flag(name)} must be in [{low}, {high}{')' if rule.high_open else ']'}, "
                                  f"got {value}")
    for name, rule, value in fields:
        if rule.choices and value not in rule.choices:
            raise T2TViTError(f"{flag(name)} must be one of {', '.join(rule.choices)}, got {value!r}")
    if cfg.opt == "sgd" and cfg.momentum == 0:
        raise T2TViTError("--opt sgd is Nesterov SGD, which needs --momentum above 0; for plain SGD use "
                          "--opt momentum --momentum 0")
    _check_device(cfg.device)


def _check_device(device: str) -> None:
    """'auto', or a device torch knows and this machine has."""
    import torch

    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise T2TViTError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise T2TViTError(f"--device {device} asks for a GPU, but CUDA is not available here; use --device cpu")


def _check_img_size(img_size: Any) -> None:
    if img_size is None:
        return
    sizes = [img_size] if isinstance(img_size, int) and not isinstance(img_size, bool) else img_size
    if not isinstance(sizes, list) or len(sizes) not in (1, 2) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise T2TViTError(f"--img-size must be a positive int or H,W, got {img_size!r}")
    if max(sizes) > MAX_IMG:
        raise T2TViTError(f"--img-size must be at most {MAX_IMG} pixels per side, got {img_size!r}")


# ---- paths ---------------------------------------------------------------------------------------------
def check_paths(cfg: Any, finetune: ModelSource | None) -> None:
    for name in (f.name for f in dataclasses.fields(cfg) if rules(f).path):
        value = getattr(cfg, name)  # written into config.yaml and the checkpoints' metadata
        try:
            if value is not None:
                value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise T2TViTError(f"{flag(name)} {value!r} is not valid UTF-8; choose a path whose name is") from err
    if cfg.data not in BUILTIN and not is_reader_spec(cfg.data) and not os.path.exists(cfg.data):
        raise T2TViTError(f"data path {cfg.data!r} does not exist (use --data digits for the built-in demo data)")
    if finetune is not None and finetune.kind == "name":
        raise T2TViTError(f"--finetune file {cfg.finetune!r} does not exist (and it is no pretrained tag "
                          "such as t2t_vit_14.in1k)")
    if cfg.teacher_checkpoint is not None and not os.path.isfile(cfg.teacher_checkpoint):
        raise T2TViTError(f"--teacher-checkpoint file {cfg.teacher_checkpoint!r} does not exist")
    if cfg.resume not in (None, "auto") and not os.path.exists(cfg.resume):
        raise T2TViTError(f"--resume path {cfg.resume!r} does not exist (use --resume auto to pick up the last run)")


# ---- the model -------------------------------------------------------------------------------------------
def check_model(cfg: Any, finetune: ModelSource | None, teacher: ModelSource | None) -> None:
    """A known model name, model arguments it takes, and (T2T-ViT) an input size its stem can tokenise;
    fills in ``img_size``/``stem`` from the model's registration where they are None. ``finetune`` and
    ``teacher`` are ``cfg.finetune`` and ``cfg.teacher`` as parsed (None when not given)."""
    import timm

    import t2t_vit

    if finetune is not None and finetune.kind == "tag" and finetune.model != cfg.model:
        raise T2TViTError(f"--finetune {cfg.finetune} holds a {finetune.model} but --model is {cfg.model}")
    if is_t2t_vit(cfg.model):
        _check_t2t(cfg)
    elif timm.is_model(cfg.model):
        if cfg.img_size is None:
            pretrained_cfg = timm.models.get_pretrained_cfg(cfg.model)
            cfg.img_size = list(pretrained_cfg.input_size[1:]) if pretrained_cfg else 224
    else:
        raise T2TViTError(f"unknown model {cfg.model!r}{did_you_mean(cfg.model, t2t_vit.list_models() + timm.list_models())}")
    if isinstance(cfg.img_size, list) and len(cfg.img_size) == 1:
        cfg.img_size = cfg.img_size[0]
    if isinstance(cfg.img_size, list) and cfg.img_size[0] == cfg.img_size[1]:
        cfg.img_size = cfg.img_size[0]
    if teacher is not None and teacher.kind == "name" and not os.path.exists(teacher.text) and \
            not is_t2t_vit(teacher.model) and not timm.is_model(teacher.model):
        raise T2TViTError(f"--teacher {teacher.text!r} is neither an existing checkpoint file nor a known model name")


def _check_t2t(cfg: Any) -> None:
    from t2t_vit.model import T2TViT, to_2tuple_size
    from t2t_vit.t2t import resolve_stem, token_grid
    from t2t_vit.variants import VARIANTS

    accepted = set(inspect.signature(T2TViT.__init__).parameters) - {"self", "img_size", "num_classes", "stem"}
    unknown = sorted(str(k) for k in cfg.model_kwargs if k not in accepted)
    if unknown:
        taken = ", ".join(sorted(accepted))
        raise T2TViTError(f"--model-kwargs: {cfg.model} takes no argument {', '.join(map(repr, unknown))}; "
                          f"T2T-ViT arguments: {taken} (img_size, stem, num_classes have their own flags)")
    arch = {**VARIANTS[cfg.model].arch, **cfg.model_kwargs}
    defaults = inspect.signature(T2TViT.__init__).parameters
    if cfg.img_size is None:
        cfg.img_size = arch.get("img_size", defaults["img_size"].default)
    if cfg.stem is None:
        cfg.stem = arch.get("stem", defaults["stem"].default)
    if arch.get("tokenizer", defaults["tokenizer"].default) != "patch":
        token_grid(to_2tuple_size(cfg.img_size), resolve_stem(cfg.stem))

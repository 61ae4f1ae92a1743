"""Loading checkpoints: the build layer.

read (:mod:`t2t_vit.reading`: formats, safe unpickling, EMA choice, validated metadata) →
adapt (:mod:`t2t_vit.adapting`: wrapper prefixes, position table, head) →
build (here: weights into an existing model, or the model a file describes).

- :func:`load_checkpoint` loads weights into a model you built (fine-tune, resume, evaluation,
  a distillation teacher);
- :func:`model_from_checkpoint` builds the model a file describes and loads it (predict, export,
  visualize, eval, convert, torch.hub).

Both read the file once and share :func:`t2t_vit.adapting.load_adapted`, where the one
head/fit check lives.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

from torch import Tensor, nn

from t2t_vit.adapting import LoadReport, describe_state_dict, load_adapted
from t2t_vit.errors import T2TViTError, did_you_mean
from t2t_vit.interop import pretrained_cfg_fields
from t2t_vit.metadata import check_img_size, check_model_name
from t2t_vit.modelguard import base_name, check_budget, screen_arguments
from t2t_vit.reading import read_checkpoint
from t2t_vit.table import VARIANTS
from t2t_vit.variants import likely_variants

_AUTHORS = ("authors", "authors-cifar", "state_dict", "unknown")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                    use_ema: bool | None = None, new_head: bool = True) -> LoadReport:
    """Load a checkpoint into ``model`` in place, adapting what can be adapted.

    The position table is resampled (bicubic, cls row kept) when the token grid differs; a
    different class count keeps the model's freshly initialised head (logged), or is an error
    with ``new_head=False``. Anything else that does not fit raises :class:`T2TViTError` with one
    line naming the missing, unexpected and mismatched keys and the likely cause;
    ``strict=False`` loads what fits instead.
    """
    return load_read(model, read_checkpoint(path, use_ema), path, strict=strict, new_head=new_head)


def load_read(model: nn.Module, read: tuple[Mapping[str, Tensor], str, Mapping[str, Any]], path: Any,
              strict: bool = True, new_head: bool = True) -> LoadReport:
    """:func:`load_checkpoint` for a file already read (``read`` as :func:`t2t_vit.reading.read_checkpoint`
    returns it), so a caller that needed its metadata first does not read it twice."""
    state_dict, source, meta = read
    report = LoadReport(path=str(path), source=source)
    return load_adapted(model, state_dict, meta, report, strict=strict, new_head=new_head, guess=likely_variants)


# ---- building the model a checkpoint describes ---------------------------------------------
def _authors_name(meta: Mapping[str, Any]) -> str | None:
    for name in (meta.get("arch"), (meta.get("args") or {}).get("model")):
        if isinstance(name, str) and name.lower() in VARIANTS:
            return name.lower()
    return None


def checkpoint_model_name(meta: Mapping[str, Any], state_dict: Mapping[str, Tensor], path: Any,
                          name: str | None = None) -> str:
    """The model to build: ``name`` if given (it must agree with ours), else what the file says
    (our ``model``, the authors' ``arch``/``args.model``), else a guess from tensor shapes."""
    stored = meta.get("model")
    if stored is not None:
        stored = check_model_name(stored, path)
        if name and stored != name:
            raise T2TViTError(f"{path} holds a {stored!r} model, not {name!r}; drop --model or correct it")
        return stored
    if name:
        return name
    guess = _authors_name(meta) or next(iter(likely_variants(describe_state_dict(state_dict))), None)
    if guess:
        return guess  # same shapes (e.g. t2t_vit_14 and _14_resnext) load either way; --model picks
    raise T2TViTError(f"{path} does not say which model it holds; pass --model NAME")


def probe_model(name: str, kwargs: Mapping[str, Any], path: Any) -> None:
    """Check that ``name`` is a registered model and that the size its arguments ask for is
    within :data:`t2t_vit.modelguard.MAX_PARAMS`, before anything is allocated."""
    import timm

    if not timm.is_model(name):
        raise T2TViTError(f"{path}: unknown model {name!r}{did_you_mean(name, timm.list_models() + list(VARIANTS))}")
    check_budget(name, kwargs, path)


def create_checked(name: str, kwargs: Mapping[str, Any], path: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` after :func:`probe_model`; a bad argument is one line."""
    import timm

    probe_model(name, kwargs, path)
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise T2TViTError(f"{path}: cannot build {name} with {sorted(kwargs)} ({first})") from err


def _authors_img_size(name: str, meta: Mapping[str, Any], state_dict: Mapping[str, Tensor], path: Any) -> Any:
    args_size = (meta.get("args") or {}).get("img_size")
    if isinstance(args_size, int) and not isinstance(args_size, bool):
        return check_img_size(args_size, path)
    pos = state_dict.get("pos_embed")
    if pos is None or pos.ndim != 3 or name not in VARIANTS:
        return None
    side = math.isqrt(max(pos.shape[1] - 1, 0))
    if side < 1 or side * side != pos.shape[1] - 1:
        return None
    arch = VARIANTS[name].arch
    return side * (arch.get("patch_size", 16) if arch["tokenizer"] == "patch" else 16)  # imagenet stem: 4·2·2


def checkpoint_model_kwargs(name: str, meta: Mapping[str, Any], state_dict: Mapping[str, Tensor], path: Any,
                            overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments that rebuild the checkpoint's model: its metadata, then ``overrides`` (None ignored)."""
    explicit = dict(meta.get("model_kwargs") or {})
    screen_arguments(name, explicit, path)  # the file's arguments: never a source, a file or a device
    kwargs = dict(explicit)
    kwargs.update({key: meta[key] for key in ("img_size", "stem", "num_classes") if meta.get(key) is not None})
    if meta.get("format") in _AUTHORS:
        head = state_dict.get("head.weight")
        kwargs.setdefault("num_classes", int(head.shape[0]) if head is not None and head.ndim == 2 else 0)
        size = _authors_img_size(name, meta, state_dict, path)
        if size is not None:
            kwargs.setdefault("img_size", size)
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    kwargs.setdefault("num_classes", 1000)
    if base_name(name) not in VARIANTS:
        # img_size/stem are T2T-ViT arguments; another timm model keeps only the ones it was built with
        for key in ("img_size", "stem"):
            if key not in explicit:
                kwargs.pop(key, None)
    return kwargs


def build_from_checkpoint(path: str | os.PathLike, name: str | None = None, use_ema: bool | None = None,
                          **overrides: Any) -> tuple[nn.Module, dict[str, Any], str]:
    """(model, the file's metadata, which copy was loaded): :func:`model_from_checkpoint` plus context."""
    state_dict, source, meta = read_checkpoint(path, use_ema)
    name = checkpoint_model_name(meta, state_dict, path, name)
    kwargs = checkpoint_model_kwargs(name, meta, state_dict, path, overrides)
    kwargs.setdefault("pretrained_cfg_overlay", pretrained_cfg_fields(meta))  # timm's clients see the file's cfg
    model = create_checked(name, kwargs, path)
    load_adapted(model, state_dict, meta, LoadReport(path=str(path), source=source), strict=True, new_head=False,
                 guess=likely_variants)
    return model, meta, source


def model_from_checkpoint(path: str | os.PathLike | None, name: str | None = None, use_ema: bool | None = None,
                          with_metadata: bool = False, **overrides: Any) -> Any:
    """Build the model a checkpoint describes and load its weights (eval, predict, export, teachers).

    Ours name their model and its arguments in their metadata; the authors' name it in ``arch``
    (or their saved ``args``); otherwise it is guessed from tensor shapes, or pass ``name``.
    ``overrides`` (e.g. ``img_size=384``, ``num_classes=10``) win over the metadata; None values
    are ignored. Without ``path`` the model is freshly initialised. A model name that is not a
    T2T-ViT is built with ``timm.create_model`` (e.g. a ResNet teacher). A metadata model name
    never selects a remote source. ``with_metadata=True`` returns ``(model, metadata)``.
    """
    if path:
        model, meta, _ = build_from_checkpoint(path, name, use_ema, **overrides)
        return (model, meta) if with_metadata else model
    if not name:
        raise T2TViTError("give a model name or a checkpoint")
    kwargs = checkpoint_model_kwargs(name, {}, {}, "<no checkpoint>", overrides)
    model = create_checked(name, kwargs, "<no checkpoint>")
    return (model, {}) if with_metadata else model

"""Checkpoints that survive SIGKILL: safetensors weights + a weights-only training-state file.

Beside them, ``<stem>.pth.tar`` holds the same weights as timm's train.py writes them
(``state_dict``, ``state_dict_ema``) for timm's ``validate.py --checkpoint`` / ``load_checkpoint``.

``<stem>.safetensors``: model weights under plain keys, the EMA copy under ``ema.`` keys, and
string metadata (``format="t2t-vit"``, model, model_kwargs, num_classes, img_size, stem,
class_names, preferred, step). ``<stem>.state.pt``: optimizer, scheduler, scaler, step, epoch,
position inside the epoch, RNG states, history and config, readable with
``torch.load(weights_only=True)``.

Every file is written to a temporary file in the same directory, fsynced and renamed over the
old one. The state goes first and the previous state is kept as ``<stem>.state.prev.pt``, so a
kill at any instant leaves weights whose step matches one of the two state files.
"""
from __future__ import annotations

import io
import math
import os
import random
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from t2t_vit.errors import T2TViTError
from t2t_vit.interop import save_timm_checkpoint, timm_path
from t2t_vit.reading import check_zip_bounds, read_metadata, split_ema
from t2t_vit.storage import atomic_write, save_weights

def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = dict(
        python=list(random.getstate()[1]),
        python_gauss=random.getstate()[2],
        numpy=torch.from_numpy(np_state[1].astype(np.int64)),
        numpy_pos=int(np_state[2]), numpy_has_gauss=int(np_state[3]), numpy_gauss=float(np_state[4]),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    try:
        _set_rng_state(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as err:
        raise T2TViTError(f"the saved random-number states cannot be restored ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:120]}); the run cannot be resumed exactly") from err


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(stem: str, model: nn.Module, ema: nn.Module | None, meta: dict[str, Any],
                    state: dict[str, Any] | None) -> None:
    """Write ``stem.state.pt`` (if ``state``) then ``stem.safetensors``; both carry ``meta['step']``.

    ``meta`` is written as given (the trainer builds it with :func:`t2t_vit.metadata.checkpoint_metadata`)."""
    if state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        final = f"{stem}.state.pt"
        if os.path.exists(final):
            os.replace(final, f"{stem}.state.prev.pt")
        atomic_write(final, buffer.getvalue())
    save_weights(model, f"{stem}.safetensors", meta, ema=ema)
    save_timm_checkpoint(timm_path(stem), model, ema, meta)  # for timm's scripts


def checkpoint_stem(path: str) -> str:
    """``run_dir`` → ``run_dir/checkpoint-last``; ``x.safetensors`` / ``x.state.pt`` → ``x``."""
    if os.path.isdir(path):
        return os.path.join(path, "checkpoint-last")
    for suffix in (".safetensors", ".state.prev.pt", ".state.pt"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def load_resume(stem: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model weights, EMA weights, training state) of a checkpoint whose two files agree on the step."""
    weights_path = f"{stem}.safetensors"
    if not os.path.isfile(weights_path):
        raise T2TViTError(f"no checkpoint to resume at {weights_path}")
    step = _as_int(read_metadata(weights_path).get("step"), -1)
    for state_path in (f"{stem}.state.pt", f"{stem}.state.prev.pt"):
        if not os.path.isfile(state_path):
            continue
        check_zip_bounds(state_path)  # the bound every other torch file gets before it is inflated
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch.load raises many types for a bad or unsafe file
            raise T2TViTError(f"{state_path} cannot be read safely ({str(err).splitlines()[0]})") from err
        if not isinstance(state, dict):
            raise T2TViTError(f"{state_path} is not a training-state file (it holds a {type(state).__name__})")
        if _as_int(state.get("step")) == step:
            model, ema = split_ema(load_file(weights_path))
            return model, ema, state
    raise T2TViTError(f"{weights_path} (step {step}) has no training-state file with the same step; cannot resume exactly")


def _as_int(value: Any, default: int = -2) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


STATE_KEYS = ("step", "epoch", "position", "optimizer", "scheduler", "scaler", "rng", "history", "best",
              "train_seconds", "train_images", "skipped", "epoch_sums")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What each restored value must look like; anything else would fail somewhere deep in the loop.
STATE_SHAPES = {
    "step": _count, "epoch": _count, "position": _count, "train_images": _count, "skipped": _count,
    "train_seconds": lambda v: _number(v) and v >= 0,
    "history": lambda v: isinstance(v, list) and all(isinstance(row, dict) for row in v),
    "best": lambda v: isinstance(v, dict) and _number(v.get("top1")) and _number(v.get("epoch")),
    "epoch_sums": lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v),
    "rng": lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(r, dict) for r in v),
    "optimizer": lambda v: isinstance(v, dict), "scheduler": lambda v: isinstance(v, dict),
    "scaler": lambda v: isinstance(v, dict),
}


def check_state(state: dict[str, Any], stem: str) -> None:
    """Refuse a training-state file that lacks what resuming restores, or holds it in another form."""
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise T2TViTError(f"{stem}.state.pt lacks {', '.join(missing)}; it was not written by this trainer, "
                          "so the run cannot be resumed exactly (use --finetune to start from its weights)")
    bad = [key for key, fits in STATE_SHAPES.items() if not fits(state[key])]
    if bad:
        shown = ", ".join(f"{key}={_short(state[key])}" for key in bad)
        raise T2TViTError(f"{stem}.state.pt holds malformed values ({shown}), so the run cannot be resumed "
                          "exactly (use --finetune to start from its weights)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_weights_for_resume(model: nn.Module, weights: dict[str, torch.Tensor], stem: str, what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with one line instead of torch's listing of every key."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        own = model.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in weights and weights[k].shape != own[k].shape]
        found = "; ".join(part for part in (
            f"{len(shapes)} tensors of another shape (first: {shapes[0]})" if shapes else "",
            f"{len(missing)} missing (first: {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "") if part)
        raise T2TViTError(f"cannot resume from {stem}: its {what} weights belong to another model ({found}); "
                          "resume with the run's own --model, --model-kwargs, --img-size and --stem "
                          "(its config.yaml), or use --finetune to start from these weights") from err

"""Checkpoints that survive SIGKILL: safetensors weights + a weights-only training-state file.

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
import json
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from t2t_vit.errors import T2TViTError

FORMAT = "t2t-vit"


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise T2TViTError(f"could not write {path}: {err.strerror or err}; the previous checkpoint is intact") from None
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_dict(model: nn.Module, ema: nn.Module | None) -> dict[str, torch.Tensor]:
    # Cloned to contiguous CPU tensors: safetensors refuses shared or strided storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().to("cpu").contiguous().clone() for k, v in ema.state_dict().items()})
    return tensors


def save_weights(path: str, model: nn.Module, ema: nn.Module | None, meta: dict[str, Any]) -> None:
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    metadata["format"] = FORMAT
    atomic_write(path, save(weights_dict(model, ema), metadata=metadata))


def save_checkpoint(stem: str, model: nn.Module, ema: nn.Module | None, meta: dict[str, Any],
                    state: dict[str, Any] | None) -> None:
    """Write ``stem.state.pt`` (if ``state``) then ``stem.safetensors``; both carry ``meta['step']``."""
    if state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        final = f"{stem}.state.pt"
        if os.path.exists(final):
            os.replace(final, f"{stem}.state.prev.pt")
        atomic_write(final, buffer.getvalue())
    save_weights(f"{stem}.safetensors", model, ema, meta)


def read_metadata(path: str) -> dict[str, str]:
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise T2TViTError(f"{path} is not a readable safetensors file ({err})") from None


def split_weights(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = {k: v for k, v in tensors.items() if not k.startswith("ema.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return model, ema


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
    step = int(read_metadata(weights_path).get("step", -1))
    for state_path in (f"{stem}.state.pt", f"{stem}.state.prev.pt"):
        if not os.path.isfile(state_path):
            continue
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise T2TViTError(f"{state_path} cannot be read safely ({str(err).splitlines()[0]})") from None
        if int(state.get("step", -2)) == step:
            model, ema = split_weights(load_file(weights_path))
            return model, ema, state
    raise T2TViTError(f"{weights_path} (step {step}) has no training-state file with the same step; cannot resume exactly")

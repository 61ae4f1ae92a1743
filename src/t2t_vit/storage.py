"""Writing files so that a crash never leaves a half-written one: atomic writes, safetensors weights."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import save
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError

EMA_PREFIX = "ema."


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so readers see the old file or the whole new one, never a part.

    A temporary file in the same folder is written, fsynced and renamed over ``path``; the folder
    is fsynced so the rename itself survives a power cut. Errors (disk full, read-only folder)
    become one clear line and leave the previous file untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise T2TViTError(f"could not write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the group
        os.replace(tmp, path)
    except OSError as err:
        raise T2TViTError(
            f"could not write {path}: {err.strerror or err}; the previous checkpoint is intact"
        ) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)


def _tensors(obj: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied or sliced weights): give each its own copy
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """safetensors metadata is str → str: JSON-encode every non-string value."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def save_weights(model_or_state_dict: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, Any] | None = None,
                 ema: nn.Module | Mapping[str, Tensor] | None = None) -> Path:
    """Write weights (frozen ``pos_embed`` and Performer ``w`` included) as safetensors, atomically.

    ``ema`` adds an EMA copy under ``ema.``-prefixed keys.
    """
    tensors = _tensors(model_or_state_dict)
    if ema is not None:
        tensors.update({EMA_PREFIX + k: v for k, v in _tensors(ema).items()})
    atomic_write(path, save(tensors, metadata=encode_metadata(metadata)))
    return Path(path)

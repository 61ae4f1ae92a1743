"""Reading checkpoints without ever running pickled code: the first layer of loading.

read (this module: formats, safety, which copy, metadata) → adapt (:mod:`t2t_vit.adapting`:
prefixes, position table, head) → build (:mod:`t2t_vit.checkpoint`: a model from a file).

Formats (sniffed from the bytes, not the file name):

- the authors' ``.pth.tar`` (``state_dict_ema`` preferred, then ``state_dict``, then a bare state
  dict; ``module.`` stripped) and their CIFAR ``.pth`` (weights under ``net``);
- ``.safetensors``, including ours: plain keys for the model, ``ema.``-prefixed keys for its EMA
  copy, and string metadata validated by :mod:`t2t_vit.metadata`.

Pickle files are read with ``torch.load(weights_only=True)`` and one allowed class,
``argparse.Namespace`` (the authors' files keep their command line under ``args``): a file that
needs any other class is refused before anything in it runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from t2t_vit.errors import T2TViTError
from t2t_vit.metadata import validate_metadata
from t2t_vit.storage import EMA_PREFIX

WEIGHTS_NAME = "model.safetensors"  # inside a save_pretrained directory
# the files a Hugging Face-style folder may hold its weights in, ours first (timm's save_for_hf: either)
FOLDER_WEIGHTS = (WEIGHTS_NAME, "pytorch_model.bin")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / ModelEma wrappers, torch.compile
EMA_KEYS = ("state_dict_ema", "model_ema")
PLAIN_KEYS = ("state_dict", "model", "net")
# The only non-builtin class a weights-only unpickler may build: the authors' `args`.
SAFE_GLOBALS = [argparse.Namespace]
_ALLOWED_NAMES = {"argparse.Namespace"}
ZIP_SLACK = 64 << 20  # bytes a zip checkpoint may expand past twice its size (headers, small records)
_log = logging.getLogger(__name__)


def resolve_path(path: str | os.PathLike) -> Path:
    """The file to read: ``path`` itself, or the weights (:data:`FOLDER_WEIGHTS`) inside a pretrained directory."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in FOLDER_WEIGHTS if (path / name).is_file()), path / WEIGHTS_NAME)
    if not path.is_file():
        raise T2TViTError(f"checkpoint not found: {path}")
    return path


def is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length and a JSON object.

    A file that starts like one but declares a header longer than itself is a truncated or
    corrupt safetensors file, reported as such rather than handed to the unpickler.
    """
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    declared, size = int.from_bytes(head[:8], "little"), path.stat().st_size
    if declared > size - 8:
        raise T2TViTError(
            f"cannot read {path}: truncated or corrupt safetensors file (its header declares {declared} bytes, "
            f"the file has {size})"
        )
    return declared > 0


def _refusal(path: Path, err: pickle.UnpicklingError) -> T2TViTError:
    text = str(err)
    names = set(re.findall(r"GLOBAL (\S+) was not an allowed global", text))
    if path.is_file() and _is_zip(path):  # zip checkpoints can list every offending global
        try:
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except (RuntimeError, ValueError, pickle.UnpicklingError) as scan_err:
            _log.debug("could not list every pickled global in %s: %s", path, scan_err)
    names -= _ALLOWED_NAMES
    return T2TViTError(
        f"refusing to load {path}: it contains pickled objects that could run code "
        f"({', '.join(sorted(names)) or 'not a tensor or plain container'}); only tensors, plain containers "
        "and argparse.Namespace are accepted; re-save its tensors as .safetensors from a trusted environment"
    )


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def check_zip_bounds(path: str | os.PathLike, limit: int | None = None) -> int:
    """Refuse a zip (a torch checkpoint, a ``state.pt``) whose members would expand past ``limit``
    bytes, before anything is decompressed; returns the total uncompressed size.

    torch writes its records uncompressed, so a real checkpoint expands to about its own size; a
    DEFLATE-compressed record of zeros expands ~1000x (1.9 MB took ``convert`` to 2.6 GB). The
    default limit is twice the file plus :data:`ZIP_SLACK`.
    """
    path = Path(path)
    limit = 2 * path.stat().st_size + ZIP_SLACK if limit is None else limit
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        raise T2TViTError(f"cannot read {path}: not a readable zip checkpoint ({err})") from err
    total = 0
    for member in members:
        total += member.file_size
        if total > limit:
            raise T2TViTError(f"refusing to read {path}: its record {member.filename} expands to {member.file_size:,} "
                              f"bytes ({member.compress_size:,} stored), past the {limit:,}-byte limit for this file "
                              "(a zip bomb or a corrupt checkpoint)")
    return total


def not_a_checkpoint(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a checkpoint judging by its first bytes, or None if it may be one.

    torch writes a zip (``PK``) or, in its legacy format, a pickle (protocol 2+, ``0x80``);
    safetensors starts with a header length and ``{``. A CDN block page (``error code: 1020``),
    ``Moved``, an empty file is named by what it holds instead of reaching the unpickler.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or (len(head) > 8 and head[8:9] == b"{"):
        return None
    what = f"{path.stat().st_size} bytes starting with {head.decode('ascii', 'replace')!r}" if head else "empty"
    return f"it is {what}; a web page, an error message or another kind of file?"


def check_checkpoint_bytes(path: str | os.PathLike) -> None:
    """One line (instead of the unpickler's IndexError, KeyError, struct.error) for a file that
    cannot be a checkpoint (:func:`not_a_checkpoint`)."""
    reason = not_a_checkpoint(path)
    if reason:
        raise T2TViTError(f"cannot read {path}: not a PyTorch or safetensors checkpoint ({reason})")


def torch_load_safe(path: str | os.PathLike) -> Any:
    """``torch.load`` that only builds tensors, containers and ``argparse.Namespace``; a zip's
    expanded size is bounded first (:func:`check_zip_bounds`)."""
    path = Path(path)
    if path.is_file():
        check_checkpoint_bytes(path)
        if _is_zip(path):
            check_zip_bounds(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported operand" in text or "weights only" not in text.lower():
            raise T2TViTError(f"cannot read {path}: not a PyTorch or safetensors checkpoint (corrupt pickle)") from err
        raise _refusal(path, err) from err
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError, TypeError, struct.error) as err:
        # a damaged pickle surfaces as any of these, from inside the unpickler
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise T2TViTError(f"cannot read {path}: not a PyTorch or safetensors checkpoint ({first})") from err


def strip_wrappers(state_dict: Mapping[Any, Any], path: Path | str = "<checkpoint>") -> dict[str, Tensor]:
    """Tensors of ``state_dict`` with ``module.``/``_orig_mod.`` prefixes removed.

    Non-tensor values (e.g. a ``num_batches_tracked`` int in odd files) are skipped; a key that
    is not a string is refused.
    """
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise T2TViTError(f"cannot read {path}: its state dict has a {type(key).__name__} key ({key!r}), "
                              "not a parameter name")
        if not isinstance(value, Tensor):
            continue
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def split_ema(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(model tensors, EMA tensors) of one of our files, the ``ema.`` prefix removed."""
    model = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    return model, ema


def _choose(model: dict, ema: dict, use_ema: bool | None, preferred: str, path: Path) -> tuple[dict, str]:
    """Pick the model or EMA copy: explicit ``use_ema`` wins, else ``preferred`` where both exist."""
    if use_ema is True and not ema:
        raise T2TViTError(f"use_ema=True but {path} has no EMA weights")
    if use_ema is False and not model:
        raise T2TViTError(f"use_ema=False but {path} holds only EMA weights")
    if ema and (use_ema or (use_ema is None and (preferred == "ema" or not model))):
        return ema, "ema"
    return model, "model"


def select_state_dict(obj: Any, use_ema: bool | None = None, path: str | os.PathLike = "<checkpoint>",
                      preferred: str = "ema") -> tuple[dict[str, Tensor], str]:
    """The weights inside a loaded checkpoint object and where they came from (e.g. ``state_dict_ema``)."""
    path = Path(path)
    if not isinstance(obj, Mapping):
        raise T2TViTError(f"{path} holds a {type(obj).__name__}, not a state dict")
    ema_key = next((k for k in EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
    plain_key = next((k for k in PLAIN_KEYS if isinstance(obj.get(k), Mapping)), None)
    if ema_key or plain_key:  # a training checkpoint: containers of state dicts
        model = strip_wrappers(obj[plain_key], path) if plain_key else {}
        ema = strip_wrappers(obj[ema_key], path) if ema_key else {}
        chosen, which = _choose(model, ema, use_ema, preferred, path)
        source = ema_key if which == "ema" else plain_key
    else:  # a bare state dict, possibly ours with `ema.` keys
        chosen, which = _choose(*split_ema(strip_wrappers(obj, path)), use_ema, preferred, path)
        source = which
    if not chosen:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise T2TViTError(f"no weights found in {path} (top-level keys: {keys})")
    return chosen, str(source)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise T2TViTError(f"cannot read {path}: not a valid safetensors file ({err})") from err


def _safetensors_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise T2TViTError(f"cannot read {path}: not a valid safetensors file ({err})") from err


def read_checkpoint(path: str | os.PathLike, use_ema: bool | None = None
                    ) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """(weights, which copy they are, the file's validated metadata), reading the file once.

    Args:
        path: the authors' ``.pth.tar``/``.pth``, a ``.safetensors`` file (ours or any), or a
            :func:`t2t_vit.save_pretrained` directory.
        use_ema: True/False force the EMA/model copy; None prefers EMA in the authors' files and
            follows the ``preferred`` metadata in ours.
    """
    path = resolve_path(path)
    if is_safetensors(path):
        meta = _read_safetensors_metadata(path)
        tensors = _safetensors_tensors(path)
        state_dict, source = select_state_dict(tensors, use_ema, path, preferred=meta.get("preferred", "ema"))
        return state_dict, source, meta
    obj = torch_load_safe(path)
    state_dict, source = select_state_dict(obj, use_ema, path)
    return state_dict, source, pickle_metadata(obj)


def read_state_dict(path: str | os.PathLike, use_ema: bool | None = None) -> dict[str, Tensor]:
    """Weights of any supported checkpoint as plain model keys (see :func:`read_checkpoint`)."""
    return read_checkpoint(path, use_ema)[0]


def pickle_metadata(obj: Any) -> dict[str, Any]:
    """What the authors' pickles say about themselves: format, ``arch``, epoch, metric, ``args``."""
    if not isinstance(obj, Mapping):
        return {"format": "unknown"}
    if "net" in obj:
        fmt = "authors-cifar"
    elif any(k in obj for k in EMA_KEYS + PLAIN_KEYS):
        fmt = "authors"
    else:
        return {"format": "state_dict"}
    meta: dict[str, Any] = {"format": fmt, "has_ema": any(isinstance(obj.get(k), Mapping) for k in EMA_KEYS)}
    for key in ("arch", "epoch", "metric", "acc"):
        if isinstance(obj.get(key), (str, int, float)) and not isinstance(obj.get(key), bool):
            meta[key] = obj[key]
    if isinstance(obj.get("args"), argparse.Namespace):
        plain = (str, int, float, bool, list, tuple)
        meta["args"] = {k: v for k, v in vars(obj["args"]).items() if isinstance(v, plain)}
    return meta


def _read_safetensors_metadata(path: Path) -> dict[str, Any]:
    meta = validate_metadata(_safetensors_metadata(path), path)
    meta.setdefault("format", "safetensors")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint says about itself, validated; always has ``format``.

    Ours: ``format="t2t-vit"`` and the decoded fields (``model_kwargs``, ``img_size``,
    ``class_names``, ``num_classes``, ``step``, ``data_config``...; see
    :func:`t2t_vit.metadata.validate_metadata`). The authors': ``format="authors"`` or
    ``"authors-cifar"`` with ``arch``, ``epoch``, ``metric``/``acc`` and ``args`` where present.
    """
    path = resolve_path(path)
    if is_safetensors(path):
        return _read_safetensors_metadata(path)
    return pickle_metadata(torch_load_safe(path))

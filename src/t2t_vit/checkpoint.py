"""Reading and writing checkpoints without ever running pickled code.

Formats read (the format is sniffed from the bytes, not the file name):

- the authors' ``.pth.tar`` (``state_dict_ema`` preferred, then ``state_dict``, then a bare state
  dict; ``module.`` stripped) and their CIFAR ``.pth`` (weights under ``net``);
- ``.safetensors``, including ours: plain keys for the model, ``ema.``-prefixed keys for its EMA
  copy, and string metadata (``format="t2t-vit"``, ``model``, ``model_kwargs``, ``num_classes``,
  ``img_size``, ``class_names``, ``preferred``, ``step``).

Pickle files are read with ``torch.load(weights_only=True)`` and one allowed class,
``argparse.Namespace`` (the authors' files keep their command line under ``args``): a file that
needs any other class is refused before anything in it runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError
from t2t_vit.model import resample_position_table
from t2t_vit.storage import EMA_PREFIX, save_weights  # noqa: F401 (save_weights is re-exported)

_log = logging.getLogger(__name__)

FORMAT = "t2t-vit"
WEIGHTS_NAME = "model.safetensors"  # inside a save_pretrained directory
_JSON_FIELDS = ("model_kwargs", "num_classes", "img_size", "class_names", "step", "epoch")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / ModelEma wrappers, torch.compile
_EMA_KEYS = ("state_dict_ema", "model_ema")
_PLAIN_KEYS = ("state_dict", "model", "net")
# The only non-builtin class a weights-only unpickler may build: the authors' `args`.
SAFE_GLOBALS = [argparse.Namespace]


# ---- reading -------------------------------------------------------------------------------
def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME  # a save_pretrained directory
    if not path.is_file():
        raise T2TViTError(f"checkpoint not found: {path}")
    return path


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length and a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def torch_load_safe(path: str | os.PathLike) -> Any:
    """``torch.load`` that only builds tensors, containers and ``argparse.Namespace``."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported operand" in text or "weights only" not in text.lower():
            raise T2TViTError(f"cannot read {path}: not a PyTorch or safetensors checkpoint (corrupt pickle)") from None
        names = set(re.findall(r"GLOBAL (\S+) was not an allowed global", text))
        try:  # zip checkpoints can list every offending global, not just the first
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:
            pass
        raise T2TViTError(
            f"refusing to load {path}: it contains pickled objects that could run code "
            f"({', '.join(sorted(names)) or 'not a tensor or plain container'}); only tensors, plain containers "
            "and argparse.Namespace are accepted; re-save its tensors as .safetensors from a trusted environment"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise T2TViTError(f"cannot read {path}: not a PyTorch or safetensors checkpoint ({first})") from None


def _strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue  # e.g. a `num_batches_tracked` int in odd files; never code
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def split_ema(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
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
    ema_key = next((k for k in _EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
    plain_key = next((k for k in _PLAIN_KEYS if isinstance(obj.get(k), Mapping)), None)
    if ema_key or plain_key:  # a training checkpoint: containers of state dicts
        model = _strip_wrappers(obj[plain_key]) if plain_key else {}
        ema = _strip_wrappers(obj[ema_key]) if ema_key else {}
        chosen, which = _choose(model, ema, use_ema, preferred, path)
        source = ema_key if which == "ema" else plain_key
    else:  # a bare state dict, possibly ours with `ema.` keys
        chosen, which = _choose(*split_ema(_strip_wrappers(obj)), use_ema, preferred, path)
        source = which
    if not chosen:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise T2TViTError(f"no weights found in {path} (top-level keys: {keys})")
    return chosen, str(source)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise T2TViTError(f"cannot read {path}: not a valid safetensors file ({err})") from None


def read_checkpoint(path: str | os.PathLike, use_ema: bool | None = None
                    ) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """(weights, which copy they are, the file's metadata): see :func:`read_state_dict`."""
    path = _resolve(path)
    if _is_safetensors(path):
        meta = read_metadata(path)
        from safetensors.torch import load_file

        tensors = load_file(str(path), device="cpu")
        state_dict, source = select_state_dict(tensors, use_ema, path, preferred=meta.get("preferred", "ema"))
        return state_dict, source, meta
    obj = torch_load_safe(path)
    state_dict, source = select_state_dict(obj, use_ema, path)
    return state_dict, source, _pickle_metadata(obj)


def read_state_dict(path: str | os.PathLike, use_ema: bool | None = None) -> dict[str, Tensor]:
    """Weights of any supported checkpoint as plain model keys (no ``module.``/``ema.`` prefixes).

    Args:
        path: the authors' ``.pth.tar``/``.pth``, a ``.safetensors`` file (ours or any), or a
            :func:`t2t_vit.save_pretrained` directory.
        use_ema: True/False force the EMA/model copy; None prefers EMA in the authors' files and
            follows the ``preferred`` metadata in ours.
    """
    return read_checkpoint(path, use_ema)[0]


def _decode(meta: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(meta)
    for key in _JSON_FIELDS:
        if key in out:
            try:
                out[key] = json.loads(out[key])
            except (TypeError, json.JSONDecodeError):
                pass  # keep the string: metadata from other tools
    return out


def _pickle_metadata(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        return {"format": "unknown"}
    if "net" in obj:
        fmt = "authors-cifar"
    elif any(k in obj for k in _EMA_KEYS + _PLAIN_KEYS):
        fmt = "authors"
    else:
        return {"format": "state_dict"}
    meta: dict[str, Any] = {"format": fmt, "has_ema": any(isinstance(obj.get(k), Mapping) for k in _EMA_KEYS)}
    for key in ("arch", "epoch", "metric", "acc"):
        if isinstance(obj.get(key), (str, int, float)):
            meta[key] = obj[key]
    if isinstance(obj.get("args"), argparse.Namespace):
        meta["args"] = {k: v for k, v in vars(obj["args"]).items() if isinstance(v, (str, int, float, bool, list, tuple))}
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint says about itself; always has ``format``.

    Ours: ``format="t2t-vit"`` and the decoded fields (``model_kwargs``/``img_size``/``class_names``
    as JSON values, ``num_classes``/``step`` as ints). The authors': ``format="authors"`` or
    ``"authors-cifar"`` with ``arch``, ``epoch``, ``metric``/``acc`` and ``args`` where present.
    """
    path = _resolve(path)
    if _is_safetensors(path):
        meta = _decode(_safetensors_metadata(path))
        meta.setdefault("format", "safetensors")
        return meta
    return _pickle_metadata(torch_load_safe(path))


# ---- adapting to a model -------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did. ``replaced_head`` = (checkpoint classes, model classes)."""

    path: str
    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    resampled_pos_embed: tuple[tuple[int, int], tuple[int, int]] | None = None
    replaced_head: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _metadata_grid(num_tokens: int, model: nn.Module, meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """The checkpoint's token grid from its ``img_size`` metadata, when that agrees with its table."""
    img_size = meta.get("img_size")
    if img_size is None or not hasattr(model, "tokens_to_token"):
        return None
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    try:
        grid = model.tokens_to_token.grid(size)
    except T2TViTError:
        return None
    return grid if grid[0] * grid[1] == num_tokens else None


def _source_grid(num_tokens: int, model: nn.Module, meta: Mapping[str, Any]) -> tuple[int, int]:
    grid = _metadata_grid(num_tokens, model, meta)
    if grid:
        return grid
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise T2TViTError(
            f"cannot resample the position table: the checkpoint has {num_tokens} tokens, not a square grid, "
            "and no img_size metadata"
        )
    return side, side


def adapt_state_dict(state_dict: dict[str, Tensor], model: nn.Module, meta: Mapping[str, Any] | None = None,
                     report: LoadReport | None = None) -> tuple[dict[str, Tensor], LoadReport]:
    """Fit ``state_dict`` to ``model``: resample ``pos_embed``, keep the model's head on a class-count
    change, and record what still does not fit (missing, unexpected, shape-mismatched keys)."""
    report = report or LoadReport(path="<state dict>", source="state_dict")
    target = model.state_dict()
    state_dict = dict(state_dict)
    pos, own_pos = state_dict.get("pos_embed"), target.get("pos_embed")
    grid = getattr(model, "grid_size", None)  # other timm models (e.g. a ViT teacher) are loaded as they are
    if pos is not None and own_pos is not None and grid is not None and pos.shape[-1] == own_pos.shape[-1]:
        new = tuple(grid)
        if pos.shape != own_pos.shape:
            old = _source_grid(pos.shape[1] - 1, model, meta or {})
        else:  # same length, but maybe another grid (8x12 vs 12x8): only metadata can tell
            old = _metadata_grid(pos.shape[1] - 1, model, meta or {}) or new
        if old != new:
            state_dict["pos_embed"] = resample_position_table(pos.float(), new, old).to(pos.dtype)
            report.resampled_pos_embed = (old, new)
    head_w, own_w = state_dict.get("head.weight"), target.get("head.weight")
    if own_w is None and head_w is not None:
        # a feature extractor (num_classes=0): the checkpoint's classifier has nowhere to go
        state_dict.pop("head.weight"), state_dict.pop("head.bias", None)
        report.replaced_head = (head_w.shape[0], 0)
    elif own_w is not None and (head_w is None or (head_w.shape[0] != own_w.shape[0] and head_w.shape[1:] == own_w.shape[1:])):
        # another class count (or no classifier saved): keep the model's freshly initialised head
        state_dict["head.weight"], state_dict["head.bias"] = own_w, target["head.bias"]
        report.replaced_head = (0 if head_w is None else head_w.shape[0], own_w.shape[0])
    report.missing = [k for k in target if k not in state_dict]
    report.unexpected = sorted((k for k in state_dict if k not in target), key=_natural)
    report.mismatched = [
        (k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in target.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    return state_dict, report


def describe_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture facts readable from tensor shapes alone."""
    desc: dict[str, Any] = {}
    if "cls_token" in state_dict:
        desc["width"] = state_dict["cls_token"].shape[-1]
    depth = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if depth:
        desc["depth"] = max(depth) + 1
    if "tokens_to_token.attention1.w" in state_dict:
        desc["T2T layer"] = "performer"
    elif "tokens_to_token.attention1.attn.qkv.weight" in state_dict:
        desc["T2T layer"] = "transformer"
    elif any(k.startswith("tokens_to_token.convs.") for k in state_dict):
        desc["T2T layer"] = "conv"
    elif "tokens_to_token.proj.weight" in state_dict:
        desc["T2T layer"] = "patch"
    first = state_dict.get("tokens_to_token.attention1.norm1.weight")
    if first is not None:
        desc["first soft-split width"] = first.shape[0]  # in_chans * kernel**2: 147 imagenet, 27 small stem
    if "blocks.0.mlp.fc1.weight" in state_dict:
        desc["MLP width"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    if depth:
        se = any(".se_layer." in k for k in state_dict)
        desc["block"] = "se" if se else "ghost" if any(".cheap_operation" in k for k in state_dict) else "standard"
    return desc


def likely_variants(desc: Mapping[str, Any]) -> list[str]:
    from t2t_vit.variants import VARIANTS

    return [
        name for name, v in VARIANTS.items()
        if not v.arch.get("dense_stages") and v.arch.get("embed_dim") == desc.get("width")
        and v.arch.get("depth") == desc.get("depth") and v.arch.get("tokenizer") == desc.get("T2T layer")
        and v.arch.get("block", "standard") == desc.get("block")
    ]


def _natural(key: str) -> list:
    """Sort key that puts blocks.2 before blocks.10 (safetensors stores keys alphabetically)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _preview(items: list[str], limit: int = 4) -> str:
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def mismatch_message(report: LoadReport, state_dict: Mapping[str, Tensor], model: nn.Module) -> str:
    """One line: what does not fit, the likely cause, and what to do."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    ckpt, own = describe_state_dict(state_dict), describe_state_dict(model.state_dict())
    diffs = [k for k in ckpt if k in own and ckpt[k] != own[k]]
    parts = [f"checkpoint {report.path} does not fit {name}"]
    if diffs:
        cause = (f"checkpoint is for a model of {', '.join(f'{k} {ckpt[k]}' for k in diffs)}, "
                 f"this model has {', '.join(f'{k} {own[k]}' for k in diffs)}")
        guesses = [g for g in likely_variants(ckpt) if g != name]
        if guesses:
            cause += f" (the checkpoint looks like {' or '.join(guesses[:3])})"
        parts.append(cause)
    if report.missing:
        parts.append(f"{len(report.missing)} missing keys: {_preview(report.missing)}")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected keys: {_preview(report.unexpected)}")
    if report.mismatched:
        shapes = [f"{k} {list(a)} vs {list(b)}" for k, a, b in report.mismatched]
        parts.append(f"{len(shapes)} shape mismatches (checkpoint vs model): {_preview(shapes, 3)}")
    parts.append("use the model the checkpoint was trained as (or strict=False to load only what fits)")
    return "; ".join(parts)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                    use_ema: bool | None = None) -> LoadReport:
    """Load a checkpoint into ``model`` in place, adapting what can be adapted.

    The position table is resampled (bicubic, cls row kept) when the token grid differs; a
    different class count keeps the model's freshly initialised head (logged once). Anything
    else that does not fit raises :class:`T2TViTError` with one line listing the missing,
    unexpected and mismatched keys and the likely cause; ``strict=False`` loads what fits instead.
    """
    state_dict, source, meta = read_checkpoint(path, use_ema)
    report = LoadReport(path=str(path), source=source)
    state_dict, report = adapt_state_dict(state_dict, model, meta, report)
    if not report.ok:
        if strict:
            raise T2TViTError(mismatch_message(report, state_dict, model))
        bad = {k for k, _, _ in report.mismatched}
        state_dict = {k: v for k, v in state_dict.items() if k not in bad}
    model.load_state_dict(state_dict, strict=False)
    if report.replaced_head:
        old, new = report.replaced_head
        _log.warning("checkpoint has a %d-class head, the model %d classes: keeping the model's new head", old, new)
    if report.resampled_pos_embed:
        (oh, ow), (nh, nw) = report.resampled_pos_embed
        _log.info("resampled pos_embed from a %dx%d to a %dx%d token grid", oh, ow, nh, nw)
    return report


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Adapt a state dict (authors' layout or ours) to ``model`` for timm's pretrained loader.

    timm has already read the file weights-only (EMA preferred, ``module.`` stripped); this unwraps
    the CIFAR ``net`` layout and our ``ema.`` keys (following the file's ``preferred`` metadata),
    resamples the position table, keeps the model's head on a class-count change, and raises
    :class:`T2TViTError` with the same one-line message as :func:`load_checkpoint` otherwise.
    """
    file = getattr(model, "pretrained_cfg", {}).get("file")
    meta: dict[str, Any] = {}
    if file:
        try:
            path = _resolve(file)
            meta = read_metadata(path) if _is_safetensors(path) else {}
        except T2TViTError:
            meta = {}
    chosen, source = select_state_dict(state_dict, None, file or "<state dict>", preferred=meta.get("preferred", "ema"))
    adapted, report = adapt_state_dict(chosen, model, meta, LoadReport(path=str(file or "<state dict>"), source=source))
    if not report.ok:
        raise T2TViTError(mismatch_message(report, adapted, model))
    return adapted

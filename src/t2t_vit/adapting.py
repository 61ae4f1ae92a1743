"""Fitting a state dict to a model: the second layer of loading (read → adapt → build).

The position table is resampled (bicubic, cls row kept) when the token grid differs; a new
class count keeps the model's fresh head (when the caller allows it); anything else that does
not fit is one line naming the missing, unexpected and mismatched keys and the likely cause.
This module knows the model (``resample_position_table``) but not the table of variants: the
caller passes a ``guess`` function that names variants matching a state dict.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError
from t2t_vit.model import resample_position_table

_log = logging.getLogger(__name__)
Guess = Callable[[Mapping[str, Any]], Sequence[str]]


@dataclass
class LoadReport:
    """What a load did. ``replaced_head`` = (checkpoint classes, model classes)."""

    path: str
    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    resampled_pos_embed: tuple[tuple[int, int], tuple[int, int]] | None = None
    replaced_head: tuple[int, int] | None = None
    adapted_input_channels: tuple[int, int] | None = None  # (checkpoint's, model's) image channels

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
    except T2TViTError as err:
        _log.debug("img_size metadata %s gives no token grid: %s", img_size, err)
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


def _check_table(pos: Tensor, path: str) -> None:
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 2 or pos.shape[2] < 1:
        raise T2TViTError(f"{path}: pos_embed has shape {list(pos.shape)}; a position table is "
                          "[1, 1 + tokens, width] with at least one token")


def _adapt_table(state_dict: dict, target: Mapping[str, Tensor], model: nn.Module, meta: Mapping[str, Any],
                 report: LoadReport) -> None:
    pos, own_pos = state_dict.get("pos_embed"), target.get("pos_embed")
    if pos is None:
        return
    _check_table(pos, report.path)
    grid = getattr(model, "grid_size", None)  # other timm models (e.g. a ViT teacher) load as they are
    if own_pos is None or grid is None or pos.shape[-1] != own_pos.shape[-1]:
        return
    new = tuple(grid)
    if pos.shape != own_pos.shape:
        old = _source_grid(pos.shape[1] - 1, model, meta)
    else:  # same length, but maybe another grid (8x12 vs 12x8): only metadata can tell
        old = _metadata_grid(pos.shape[1] - 1, model, meta) or new
    if old != new:
        state_dict["pos_embed"] = resample_position_table(pos.float(), new, old).to(pos.dtype)
        report.resampled_pos_embed = (old, new)


def _adapt_head(state_dict: dict, target: Mapping[str, Tensor], report: LoadReport) -> None:
    for prefix in ("head", "aux_head"):  # the classifier, and Token Labeling's one over patch tokens
        if prefix == "aux_head" and "aux_head.weight" not in target and "head.weight" in target:
            continue  # a model built without the auxiliary head: its keys are unexpected, not dropped
        replaced = _adapt_classifier(state_dict, target, prefix)
        if replaced and prefix == "head":
            report.replaced_head = replaced


def _adapt_classifier(state_dict: dict, target: Mapping[str, Tensor], prefix: str) -> tuple[int, int] | None:
    head_w, own_w = state_dict.get(f"{prefix}.weight"), target.get(f"{prefix}.weight")
    if own_w is None and head_w is not None:
        # a feature extractor (num_classes=0): the checkpoint's classifier has nowhere to go
        state_dict.pop(f"{prefix}.weight"), state_dict.pop(f"{prefix}.bias", None)
        return head_w.shape[0], 0
    if own_w is not None and (head_w is None or (head_w.shape[0] != own_w.shape[0]
                                                 and head_w.shape[1:] == own_w.shape[1:])):
        # another class count (or no classifier saved): keep the model's freshly initialised head
        state_dict[f"{prefix}.weight"], state_dict[f"{prefix}.bias"] = own_w, target[f"{prefix}.bias"]
        return 0 if head_w is None else head_w.shape[0], own_w.shape[0]
    return None


def _fold_channels(value: Tensor, dim: int, channels: int) -> Tensor:
    """Fit a tensor whose axis ``dim`` holds 3 channel blocks (the soft split's channel-major
    layout, or a conv's input channels) to ``channels`` blocks, as timm's ``adapt_input_conv``
    does for convs: one channel sums the blocks of a weight (exact for a grey image repeated into
    RGB) and averages those of a norm parameter; more channels repeat them cyclically, weights
    scaled by 3/channels."""
    blocks = value.unflatten(dim, (3, value.shape[dim] // 3))
    if channels == 1:
        folded = blocks.mean(dim, keepdim=True) if value.ndim == 1 else blocks.sum(dim, keepdim=True)
    else:
        folded = blocks.index_select(dim, torch.arange(channels) % 3)
        folded = folded if value.ndim == 1 else folded * (3.0 / channels)
    return folded.flatten(dim, dim + 1)


def _adapt_input_channels(state_dict: dict, target: Mapping[str, Tensor], report: LoadReport) -> None:
    """A 3-channel checkpoint in a model built with another ``in_chans``: the tokenizer's first
    layer (soft-split LayerNorm and projection, first conv, patch conv) takes the other count."""
    for key, own in target.items():
        theirs = state_dict.get(key)
        if not key.startswith("tokens_to_token.") or theirs is None or theirs.shape == own.shape:
            continue
        dim = 1 if own.ndim == 4 else own.ndim - 1
        old, new = theirs.shape[dim], own.shape[dim]
        same_rest = [a for i, a in enumerate(theirs.shape) if i != dim] == [a for i, a in enumerate(own.shape) if i != dim]
        if same_rest and old % 3 == 0 and (new * 3) % old == 0 and new != old:
            state_dict[key] = _fold_channels(theirs, dim, new * 3 // old)
            report.adapted_input_channels = (3, new * 3 // old)


def adapt_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module, meta: Mapping[str, Any] | None = None,
                     report: LoadReport | None = None) -> tuple[dict[str, Tensor], LoadReport]:
    """Fit ``state_dict`` to ``model``: resample ``pos_embed``, keep the model's head on a class-count
    change, and record what still does not fit (missing, unexpected, shape-mismatched keys)."""
    report = report or LoadReport(path="<state dict>", source="state_dict")
    target = model.state_dict()
    state_dict = dict(state_dict)
    _adapt_table(state_dict, target, model, meta or {}, report)
    _adapt_head(state_dict, target, report)
    _adapt_input_channels(state_dict, target, report)
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


def _natural(key: str) -> list:
    """Sort key that puts blocks.2 before blocks.10 (safetensors stores keys alphabetically)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _preview(items: list[str], limit: int = 4) -> str:
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def mismatch_message(report: LoadReport, state_dict: Mapping[str, Tensor], model: nn.Module,
                     guess: Guess | None = None) -> str:
    """One line: what does not fit, the likely cause (``guess`` names matching variants), what to do."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    ckpt, own = describe_state_dict(state_dict), describe_state_dict(model.state_dict())
    diffs = [k for k in ckpt if k in own and ckpt[k] != own[k]]
    parts = [f"checkpoint {report.path} does not fit {name}"]
    if diffs:
        cause = (f"checkpoint is for a model of {', '.join(f'{k} {ckpt[k]}' for k in diffs)}, "
                 f"this model has {', '.join(f'{k} {own[k]}' for k in diffs)}")
        guesses = [g for g in (guess(ckpt) if guess else []) if g != name]
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


def check_fit(report: LoadReport, state_dict: Mapping[str, Tensor], model: nn.Module, strict: bool = True,
              new_head: bool = True, guess: Guess | None = None) -> None:
    """The one place that decides whether an adapted state dict is acceptable.

    ``new_head=False`` makes a class-count change an error (evaluation, prediction, a teacher);
    ``strict=False`` accepts missing/unexpected/mismatched keys (they are then left out).
    """
    if report.replaced_head and not new_head:
        old, new = report.replaced_head
        raise T2TViTError(f"{report.path} has a {old}-class head but the model was built with {new} classes")
    if strict and not report.ok:
        raise T2TViTError(mismatch_message(report, state_dict, model, guess))


def check_finite(state_dict: Mapping[str, Tensor], path: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor: a model built from them
    answers NaN for every input (predict printed bare ``NaN``, eval a silent ``loss nan``)."""
    for key, value in state_dict.items():
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise T2TViTError(f"{path}: tensor {key} holds {bad} NaN or Inf values (of {value.numel()}); "
                                  "the checkpoint is corrupt or from a diverged run, refusing to load it")


def load_adapted(model: nn.Module, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any], report: LoadReport,
                 strict: bool = True, new_head: bool = True, guess: Guess | None = None) -> LoadReport:
    """Adapt ``state_dict`` to ``model``, check it with :func:`check_fit` and copy it in."""
    check_finite(state_dict, report.path)
    adapted, report = adapt_state_dict(state_dict, model, meta, report)
    check_fit(report, adapted, model, strict=strict, new_head=new_head, guess=guess)
    bad = {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in adapted.items() if k not in bad}, strict=False)
    if report.replaced_head:
        old, new = report.replaced_head
        _log.warning("checkpoint has a %d-class head, the model %d classes: keeping the model's new head", old, new)
    if report.resampled_pos_embed:
        (oh, ow), (nh, nw) = report.resampled_pos_embed
        _log.info("resampled pos_embed from a %dx%d to a %dx%d token grid", oh, ow, nh, nw)
    return report

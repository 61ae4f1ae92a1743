"""Evaluation (loss, top-1, top-5, throughput) and reading weights into a model."""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from t2t_vit.errors import T2TViTError
from t2t_vit.train.distributed import World, all_reduce_sum

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader | Dataset, device: torch.device | str | None = None,
             precision: str = "fp32", world: World | None = None, batch_size: int = 128) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) and images/s of ``model`` on ``data``.

    ``data`` is a DataLoader or a Dataset of (image, label). Under DDP each rank passes its shard
    and the sums are reduced, so every rank gets the metrics of the whole set.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    start = time.perf_counter()
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        k = min(5, logits.shape[-1])
        hits = logits.topk(k, dim=-1).indices.eq(target[:, None])
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=-1).sum().item()
        count += target.numel()
    seconds = time.perf_counter() - start
    model.train(was_training)
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], world or World())
    if count == 0:
        raise T2TViTError("the evaluation data set is empty")
    return dict(loss=loss_sum / count, top1=100.0 * top1 / count, top5=100.0 * top5 / count,
                images=int(count), images_per_s=count / max(seconds, 1e-9) * (world.size if world else 1))


def read_state_dict(path: str, prefer: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights of a checkpoint as a plain state dict, and our metadata (empty for other files).

    Ours (``.safetensors``): the copy named by ``preferred`` (EMA or raw) unless ``prefer`` says.
    Others (``.pth``/``.pth.tar``, e.g. the authors'): read with ``weights_only=True`` only; the
    state dict is taken from ``state_dict_ema``/``state_dict``/``model``/``net`` and ``module.``
    prefixes are dropped.
    """
    from t2t_vit.train.state import read_metadata, split_weights

    if not os.path.isfile(path):
        raise T2TViTError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        meta = read_metadata(path)
        model, ema = split_weights(load_file(path))
        which = prefer or meta.get("preferred", "model")
        return (ema if which == "ema" and ema else model), meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise T2TViTError(f"{path} cannot be loaded safely (only tensors are allowed): {str(err).splitlines()[0]}") from None
    for key in ("state_dict_ema", "state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise T2TViTError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def load_weights(model: nn.Module, path: str, drop_head: bool = False, use_ema: bool | None = None) -> dict[str, Any]:
    """Load ``path`` into ``model``; with ``drop_head`` a classifier of another shape is skipped
    (fine-tuning to a new class count). Any other mismatch is a one-line error.

    Uses :func:`t2t_vit.checkpoint.load_checkpoint` (which also adapts the authors' layouts and
    resamples position tables) when the library has it, else a minimal reader of the same formats.
    """
    from t2t_vit import checkpoint

    loader = getattr(checkpoint, "load_checkpoint", None)
    if loader is not None:
        report = loader(model, path, use_ema=use_ema)
        replaced = getattr(report, "replaced_head", None)
        if replaced and not drop_head:
            raise T2TViTError(f"{path} has a {replaced[0]}-class head but the model has {replaced[1]} classes")
        return dict(meta={}, skipped=["head"] if replaced else [])
    prefer = None if use_ema is None else ("ema" if use_ema else "model")
    state, meta = read_state_dict(path, prefer)
    own = model.state_dict()
    head_keys = set()
    if drop_head and hasattr(model, "get_classifier"):
        prefix = next((n for n, m in model.named_modules() if m is model.get_classifier()), "head")
        head_keys = {k for k in state if k.startswith(prefix + ".") and k in own and state[k].shape != own[k].shape}
    state = {k: v for k, v in state.items() if k not in head_keys}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise T2TViTError(f"{path} does not fit this model: {len(wrong)} shape mismatch(es), first {wrong[0]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise T2TViTError(f"{path} does not fit this model: {detail}")
    return dict(meta=meta, skipped=sorted(head_keys))


def model_from_checkpoint(path: str, model: str | None = None, **overrides: Any) -> nn.Module:
    """Rebuild the model a ``.safetensors`` checkpoint of ours describes and load its weights."""
    import timm

    import t2t_vit
    from t2t_vit.train.state import read_metadata

    meta = read_metadata(path) if path.endswith(".safetensors") else {}
    name = model or meta.get("model")
    if not name:
        raise T2TViTError(f"{path} does not say which model it holds; pass --model")
    kwargs = json.loads(meta.get("model_kwargs", "{}"))
    kwargs.update(overrides)
    num_classes = int(meta.get("num_classes", kwargs.pop("num_classes", 1000)))
    if name in t2t_vit.list_models():
        if "img_size" in meta:
            kwargs.setdefault("img_size", json.loads(meta["img_size"]))
        if meta.get("stem"):
            kwargs.setdefault("stem", meta["stem"])
        net = t2t_vit.create_model(name, num_classes=num_classes, **kwargs)
    else:
        net = timm.create_model(name, num_classes=num_classes, **kwargs)
    load_weights(net, path)
    return net

"""Evaluation: loss, top-1, top-5 and throughput of a model on a data set (single process or DDP)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from t2t_vit.errors import T2TViTError
from t2t_vit.precision import autocast
from t2t_vit.train.distributed import World, all_reduce_sum



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

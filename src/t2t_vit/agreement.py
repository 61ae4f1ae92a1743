"""bf16-vs-fp32 top-1 agreement of a briefly trained model on held-out data.

A random-init model is a poor judge of bf16 rounding: its logits are near ties, so any rounding
flips classes. These helpers train the architecture briefly on the digits of ``t2t-vit train``
(real data, nothing downloaded) and compare fp32 and bf16 predictions on the images it never saw.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import t2t_vit
from t2t_vit.precision import for_inference


def digits_data(img_size: int = 16) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits data set of ``t2t-vit train`` (its train/val split, no augmentation) as tensors:
    train x, y and held-out x, y."""
    from t2t_vit.data import create_datasets

    bundle = create_datasets("digits", img_size, None)

    def stack(dataset) -> tuple[Tensor, Tensor]:
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        return torch.stack(images), torch.tensor(labels)

    return (*stack(bundle.train), *stack(bundle.val))


def train_briefly(model: nn.Module, images: Tensor, labels: Tensor, steps: int, batch: int = 64, lr: float = 2e-3) -> nn.Module:
    """A few AdamW steps in fp32 with the default fast paths, so that logits mean something."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # Linear warm-up over the first quarter: deep post-init transformers stall without it.
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 4)))
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (batch,), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
    return model.eval()


@torch.inference_mode()
def bf16_agreement(model: nn.Module, images: Tensor, labels: Tensor | None = None, batch: int = 128) -> dict[str, float]:
    """Top-1 agreement of the bf16 inference model (``for_inference`` of a copy of ``model``, what
    ``t2t-vit bench`` times as ``bf16``) with ``model`` in fp32 on ``images`` (and each one's
    accuracy if labelled)."""
    model.eval()
    low = for_inference(copy.deepcopy(model), dtype=torch.bfloat16)
    fp32, bf16 = [], []
    for chunk in images.split(batch):
        fp32.append(model(chunk))
        bf16.append(low(chunk).float())
    fp32_logits, bf16_logits = torch.cat(fp32), torch.cat(bf16)
    result = dict(images=len(images), agreement=(fp32_logits.argmax(1) == bf16_logits.argmax(1)).float().mean().item(),
                  max_logit_diff=(fp32_logits - bf16_logits).abs().max().item(),
                  median_margin=_top2_margin(fp32_logits).median().item())
    if labels is not None:
        result["accuracy_fp32"] = (fp32_logits.argmax(1) == labels).float().mean().item()
        result["accuracy_bf16"] = (bf16_logits.argmax(1) == labels).float().mean().item()
    return result


def _top2_margin(logits: Tensor) -> Tensor:
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def digits_agreement(
    name: str, steps: int, img_size: int = 16, batch: int = 32, lr: float = 1e-3, **model_kwargs
) -> dict[str, float]:
    """Train ``name`` briefly on digits at ``img_size`` px (small stem), then bf16-vs-fp32 agreement held out."""
    torch.manual_seed(0)
    model = t2t_vit.create_model(name, img_size=img_size, stem="small", num_classes=10, **model_kwargs)
    train_x, train_y, test_x, test_y = digits_data(img_size)
    train_briefly(model, train_x, train_y, steps, batch=batch, lr=lr)
    return dict(model=name, img_size=img_size, steps=steps, **bf16_agreement(model, test_x, test_y))

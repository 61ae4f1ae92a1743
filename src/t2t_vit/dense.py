"""T2T-ViT as a backbone for detection and segmentation (recipe: docs/dense.md).

The multi-scale maps come from ``features_only=True``: the T2T module's two re-structurized
images (strides 4 and 8 with the ImageNet stem), the last block (16) and its 2×2 max-pool (32).
:class:`FPNBackbone` puts torchvision's feature pyramid on them and has the ``out_channels``
attribute torchvision's detectors expect; :class:`SegmentationHead` is a semantic-FPN-style
head (sum of the upsampled pyramid levels, one 1×1 classifier, upsampled to the image).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import timm
import torch.nn.functional as F
from torch import Tensor, nn


class FPNBackbone(nn.Module):
    """``timm.create_model(name, features_only=True, ...)`` followed by a feature pyramid network.

    Returns an ``OrderedDict`` of maps with ``out_channels`` channels each, keys ``"0"``–``"3"``
    (strides 4, 8, 16, 32) and ``"pool"`` (64), the layout ``torchvision.models.detection.FasterRCNN``'s
    default anchors and RoI pooler expect. ``**kwargs`` go to ``timm.create_model`` (``img_size``,
    ``dynamic_img_size=True`` for detectors that resize images, ``pretrained``, ...).
    """

    def __init__(self, name: str = "t2t_vit_14", out_channels: int = 256, **kwargs: Any) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = timm.create_model(name, features_only=True, **kwargs)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(images))))


class SegmentationHead(nn.Module):
    """Per-pixel logits from an :class:`FPNBackbone`: its levels upsampled to the finest, summed,
    a 3×3 conv + ReLU, a 1×1 classifier, then bilinear upsampling to the input size."""

    def __init__(self, backbone: FPNBackbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        width = backbone.out_channels
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, images: Tensor) -> Tensor:
        levels = [m for key, m in self.backbone(images).items() if key != "pool"]
        size = levels[0].shape[-2:]
        fused = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in levels)
        logits = self.classifier(self.fuse(fused))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

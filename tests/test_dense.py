"""Dense prediction: multi-scale features with true strides, a detector and a segmentation head.

features_only / forward_intermediates give the T2T module's re-structurized maps (strides 4, 8),
the backbone (16) and a pooled level (32); torchvision's Faster R-CNN and a semantic-FPN head
train one step on them at a non-square size (docs/dense.md).
"""
from __future__ import annotations

import math

import pytest
import timm
import torch

import t2t_vit
from t2t_vit.dense import FPNBackbone, SegmentationHead

SIZE = (224, 320)  # non-square: a 14x20 token grid


@pytest.mark.parametrize("name,size,strides", [
    ("t2t_vit_14", SIZE, [4, 8, 16, 32]),
    ("t2t_vit_t_14", (224, 224), [4, 8, 16, 32]),
    ("t2t_vit_7", (32, 32), [1, 2, 4, 8]),  # the small stem: soft-split strides 1, 2, 2
])
def test_features_only_strides_are_true(name, size, strides):
    kwargs = dict(stem="small", token_dim=16) if size == (32, 32) else {}
    model = timm.create_model(name, features_only=True, img_size=size, **kwargs).eval()
    assert model.feature_info.reduction() == strides
    with torch.no_grad():
        maps = model(torch.randn(1, 3, *size))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    for fmap, stride in zip(maps, strides):  # each map has exactly the image size over its stride
        assert tuple(fmap.shape[-2:]) == (math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def test_forward_intermediates_covers_every_level_and_matches_the_model():
    model = t2t_vit.create_model("t2t_vit_7", img_size=SIZE).eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        tokens, stages = model.tokens_to_token.forward_stages(x)
        nlc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    info = model.feature_info
    assert len(maps) == len(info) == 2 + len(model.blocks) + 1
    assert [m.shape[1] for m in maps] == [i["num_chs"] for i in info]
    assert [i["reduction"] for i in info] == [4, 8] + [16] * len(model.blocks) + [32]
    torch.testing.assert_close(final, model.forward_features(x))
    assert torch.equal(maps[0], stages[0]) and torch.equal(maps[1], stages[1])  # the T2T module's own maps
    assert torch.equal(maps[-1], torch.nn.functional.max_pool2d(maps[-2], 2, ceil_mode=True))
    assert torch.equal(nlc[0], maps[0].flatten(2).transpose(1, 2))
    assert torch.equal(nlc[1], maps[-1].flatten(2).transpose(1, 2))
    assert torch.equal(early[0], maps[1])


def test_pruned_feature_extractor_keeps_only_what_it_needs():
    net = timm.create_model("t2t_vit_7", features_only=True, out_indices=(0, 1), img_size=64)
    assert len(net.model.blocks) == 0 and net.feature_info.reduction() == [4, 8]
    full = timm.create_model("t2t_vit_7", features_only=True, img_size=64)
    assert len(full.model.blocks) == 7  # the pooled level needs every block


def _finite_grads(module: torch.nn.Module) -> None:
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_faster_rcnn_trains_a_step_on_t2t_vit_14():
    from torchvision.models.detection import FasterRCNN

    backbone = FPNBackbone("t2t_vit_14", img_size=SIZE, dynamic_img_size=True)
    detector = FasterRCNN(backbone, num_classes=3, min_size=SIZE[0], max_size=SIZE[1],
                          rpn_batch_size_per_image=32, box_batch_size_per_image=32).train()
    images = [torch.rand(3, *SIZE)]
    targets = [dict(boxes=torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 40.0, 300.0, 200.0]]),
                    labels=torch.tensor([1, 2]))]
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    _finite_grads(detector.backbone.body)
    detector.eval()
    with torch.no_grad():
        (out,) = detector(images)
    assert out["boxes"].shape[-1] == 4


def test_segmentation_head_trains_a_step_on_t2t_vit_14():
    model = SegmentationHead(FPNBackbone("t2t_vit_14", img_size=SIZE), num_classes=5).train()
    images, masks = torch.randn(1, 3, *SIZE), torch.randint(0, 5, (1, *SIZE))
    logits = model(images)
    assert logits.shape == (1, 5, *SIZE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(logits, masks)
    loss.backward()
    _finite_grads(model)
    optimizer.step()
    assert torch.isfinite(torch.nn.functional.cross_entropy(model(images), masks))

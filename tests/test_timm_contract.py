"""timm's model contract in our words: fixed tables as buffers, scripting, fx tracing, feature
extraction, timm's create_model and model methods, over every registered model."""
from __future__ import annotations

import pytest
import torch

import t2t_vit
from t2t_vit import T2TViTError, create_model
from helpers import REGISTERED, small_variant


# ---- timm's model contract: scripting, fx tracing, feature extraction ---------------------------

@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14", "vit_s16"])
def test_fixed_tables_are_persistent_buffers_under_checkpoint_keys(name):
    model = create_model(name)
    fixed = {"pos_embed"} | ({"tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
                             if name == "t2t_vit_14" else set())
    assert fixed == {n for n, _ in model.named_buffers()}
    assert not fixed & {n for n, _ in model.named_parameters()}
    assert fixed <= set(model.state_dict())
    clone = create_model(name)
    clone.load_state_dict(model.state_dict())  # strict: the keys round-trip
    for key in fixed:
        assert torch.equal(clone.get_buffer(key), model.get_buffer(key))


@pytest.mark.parametrize("name", REGISTERED)
def test_scripted_model_equals_eager(name):
    model = small_variant(name).eval()
    x = torch.randn(2, 3, 64, 64)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", REGISTERED)
def test_fx_traced_model_equals_eager_and_trains(name):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = small_variant(name).eval()
    x = torch.randn(2, 3, 64, 64)
    traced = torch.fx.symbolic_trace(model)  # plain tracing, no leaf lists passed in
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    extractor = create_feature_extractor(model.train(), return_nodes={"head": "logits"})
    extractor(x)["logits"].mean().backward()
    assert all(p.grad is not None for p in extractor.parameters())


def test_feature_extractor_returns_chosen_block_outputs():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = small_variant("t2t_vit_14", depth=3).eval()
    _, nodes = get_graph_node_names(model)
    assert {"tokens_to_token.project", "norm", "head"} <= set(nodes)
    assert any(n.startswith("blocks.2.") for n in nodes)
    extractor = create_feature_extractor(model, return_nodes={"tokens_to_token.project": "mid", "norm": "final"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["final"], model.forward_features(x))
        assert out["mid"].shape == (2, 16, 384)  # 4x4 tokens at 64 px, before the class token
    scripted = torch.jit.script(extractor)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x)["final"], out["final"])


def test_scripted_model_keeps_the_choice_of_its_instance():
    model = configure_all(small_variant("t2t_vit_t_14"), "math").eval()
    scripted = torch.jit.script(model)
    assert scripted.tokens_to_token.attention1.attn.core.attention_kernel == "math"
    with pytest.raises(Exception, match="tiled|grid"):
        scripted(torch.randn(1, 3, 50, 50))


def configure_all(model, kernel):
    return t2t_vit.configure(model, attention=kernel)


# ---- timm contract ----------------------------------------------------------------------------

def test_timm_create_model_and_contract():
    import timm

    model = timm.create_model("t2t_vit_7", num_classes=10, img_size=64).eval()
    assert model.pretrained_cfg["crop_pct"] == 0.9
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 256)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert {"cls_token", "pos_embed"} <= model.no_weight_decay()
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert "stem" in model.group_matcher()


def test_gradient_checkpointing_gives_same_gradients():
    # eval(): the Performer's dropout would otherwise draw different masks in the two passes.
    model = create_model("t2t_vit_7", img_size=32, stem="small", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, b in zip(plain, [p.grad for p in model.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(a, b)


def test_forward_intermediates_and_features_only():
    import timm

    model = create_model("t2t_vit_7", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    # levels: the T2T module's two maps, then the 7 blocks, then the pooled level
    final, inter = model.forward_intermediates(x, indices=[2, 8])
    assert [t.shape for t in inter] == [(1, 256, 4, 4)] * 2
    torch.testing.assert_close(final, model.forward_features(x))
    extractor = timm.create_model("t2t_vit_dense", features_only=True, img_size=64)
    assert [f.shape[1] for f in extractor(x)] == extractor.feature_info.channels() == [64, 64, 584, 584]


def test_unknown_model_suggests_close_names():
    with pytest.raises(T2TViTError, match="did you mean t2t_vit_14"):
        create_model("t2t_vit14")

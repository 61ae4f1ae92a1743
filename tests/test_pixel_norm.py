"""How the first T2T layer normalises raw-pixel patches (issue 24): the paper's LayerNorm by
default, RMSNorm or none as options; only the first layer changes, and the default is the paper."""
from __future__ import annotations

import pytest
import torch

import t2t_vit
from t2t_vit import T2TViTError
from t2t_vit.checkpoint import model_from_checkpoint
from t2t_vit.storage import save_weights

SMALL = dict(img_size=32, stem="small", num_classes=3, depth=1)


def build(norm: str | None, name: str = "t2t_vit_7", seed: int = 0) -> t2t_vit.T2TViT:
    torch.manual_seed(seed)
    extra = {} if norm is None else {"t2t_pixel_norm": norm}
    return t2t_vit.create_model(name, **SMALL, **extra).eval()


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_the_default_is_the_papers_layernorm(name):
    default, explicit = build(None, name), build("layernorm", name)
    assert default.state_dict().keys() == explicit.state_dict().keys()
    assert "tokens_to_token.attention1.norm1.weight" in default.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(default(x), explicit(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
@pytest.mark.parametrize("norm", ["rmsnorm", "none"])
def test_only_the_first_t2t_layer_changes(name, norm):
    paper, other = build(None, name), build(norm, name)
    differing = {k for k in paper.state_dict().keys() ^ other.state_dict().keys()}
    assert differing and all(k.startswith("tokens_to_token.attention1.norm1.") for k in differing)
    assert isinstance(other.tokens_to_token.attention2.norm1, torch.nn.LayerNorm)


def test_each_norm_computes_its_formula_on_raw_patches():
    """Against formulas written here: LayerNorm centres and scales each patch, RMSNorm only
    scales it (the mean survives), none passes the pixels through."""
    patches = torch.rand(2, 5, 27) * 0.3 + torch.tensor([0.1, 0.8]).view(2, 1, 1)  # a dark and a bright image
    norms = {k: build(k).tokens_to_token.attention1.norm1 for k in ("layernorm", "rmsnorm", "none")}
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True, unbiased=False)
    rms = patches.square().mean(-1, keepdim=True).add(1e-5).sqrt()
    with torch.no_grad():
        torch.testing.assert_close(norms["layernorm"](patches), (patches - mean) / (var + 1e-5).sqrt())
        torch.testing.assert_close(norms["rmsnorm"](patches), patches / rms)
        assert torch.equal(norms["none"](patches), patches)
    flat_dark, flat_bright = torch.full((1, 1, 27), 0.1), torch.full((1, 1, 27), 0.8)
    with torch.no_grad():  # the paper's LayerNorm maps both flat patches to the same zeros
        assert torch.equal(norms["layernorm"](flat_dark), norms["layernorm"](flat_bright))
        assert not torch.equal(norms["none"](flat_dark), norms["none"](flat_bright))


@pytest.mark.parametrize("norm", ["rmsnorm", "none"])
def test_a_checkpoint_remembers_its_pixel_norm(tmp_path, norm):
    model = build(norm)
    path = tmp_path / "m.safetensors"
    save_weights(model, path, metadata=dict(model="t2t_vit_7", model_kwargs=dict(t2t_pixel_norm=norm, depth=1),
                                            num_classes=3, img_size=32, stem="small"))
    loaded = model_from_checkpoint(path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_an_unknown_pixel_norm_is_one_line():
    with pytest.raises(T2TViTError, match="unknown pixel norm 'batchnorm'; choose one of layernorm, rmsnorm, none"):
        build("batchnorm")


def test_the_ablation_takes_it_as_an_arm_option():
    from t2t_vit.experiment import arms as A

    all_arms = A.ablation_arms(A.PRESETS["digits"])
    arm = A.select_arms(all_arms, ["t2t:t2t_norm1=none"])[0]
    assert arm.model_kwargs["t2t_pixel_norm"] == "none" and arm.name == "t2t-t2t_norm1none"
    model = A.build_arm_model(arm, num_classes=10)
    assert isinstance(model.tokens_to_token.attention1.norm1, torch.nn.Identity)
    with pytest.raises(T2TViTError, match="must be one of layernorm, rmsnorm, none"):
        A.select_arms(all_arms, ["t2t:t2t_norm1=bn"])
    with pytest.raises(T2TViTError, match="needs an arm with a T2T module"):
        A.select_arms(all_arms, ["no_t2t:t2t_norm1=none"])

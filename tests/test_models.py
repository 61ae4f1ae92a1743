"""Model library: sizes against the reference implementation, state-dict layout, numerics."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import t2t_vit
from t2t_vit import T2TViTError, create_model, list_models
from t2t_vit.model import fit_position_table
from t2t_vit.profile import count_macs, count_params
from t2t_vit.variants import VARIANTS

from helpers import REGISTERED, small_variant

# FACTS §3: params (M) and GMACs measured on the authors' implementation.
REFERENCE = {
    ("t2t_vit_7", 224): (4.310, 1.147), ("t2t_vit_10", 224): (5.889, 1.516), ("t2t_vit_12", 224): (6.942, 1.763),
    ("t2t_vit_14", 224): (21.546, 4.783), ("t2t_vit_14", 384): (21.691, 16.370), ("t2t_vit_19", 224): (39.177, 8.480),
    ("t2t_vit_24", 224): (64.106, 13.662), ("t2t_vit_t_14", 224): (21.541, 6.089),
    ("t2t_vit_t_19", 224): (39.173, 9.785), ("t2t_vit_t_24", 224): (64.101, 14.967),
    ("t2t_vit_14_resnext", 224): (21.546, 4.783), ("t2t_vit_14_wide", 224): (25.156, 5.229),
    ("t2t_vit_14_se", 224): (21.804, 4.784), ("t2t_vit_16_ghost", 224): (16.253, 3.802),
    ("t2t_vit_dense", 224): (23.647, 5.276),
}

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_registry_has_exactly_the_paper_models():
    assert list_models() == REGISTERED
    assert list_models("t2t_vit_t_*") == ["t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24"]
    import timm

    assert set(REGISTERED) <= set(timm.list_models("*"))


@pytest.mark.parametrize("name,img_size", sorted(REFERENCE))
def test_size_and_compute_match_reference_implementation(name, img_size):
    params_m, gmacs = REFERENCE[(name, img_size)]
    model = create_model(name, img_size=img_size)
    total, _ = count_params(model)
    macs, _ = count_macs(model, (3, img_size, img_size))
    assert abs(total / 1e6 - params_m) <= 0.01
    assert abs(macs / 1e9 - gmacs) / gmacs <= 0.01


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.reference is None])
def test_unreleased_models_within_ten_percent_of_paper(name):
    paper = VARIANTS[name].paper
    model = create_model(name)
    total, _ = count_params(model)
    macs, _ = count_macs(model, (3, 224, 224))
    assert abs(total / 1e6 - paper.params_m) / paper.params_m <= 0.10
    assert abs(macs / 1e9 - paper.gmacs) / paper.gmacs <= 0.10


def test_macs_without_attention_match_third_party_count():
    # A third-party table reports t2t_vit_t_14 at 4.34G: the same model without attention matmuls.
    _, no_attn = count_macs(create_model("t2t_vit_t_14"), (3, 224, 224))
    assert abs(no_attn / 1e9 - 4.34) < 0.01


@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14"])
def test_state_dict_layout_equals_released_checkpoint(name):
    expected = []
    with open(os.path.join(DATA, f"{name}.tsv")) as f:
        for line in f.read().splitlines():
            key, shape = line.split("\t")
            expected.append((key, shape))
    state = create_model(name).state_dict()
    got = [(k, str(tuple(v.shape))) for k, v in state.items()]
    assert got == expected


# ---- independent reference of the T2T module, written from the paper's equations -------------

def soft_split_reference(image: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """Eq. 3 by explicit slicing: every k×k patch, channel-major, row-major over patch positions."""
    padded = F.pad(image, (p, p, p, p))
    b, c, h, w = padded.shape
    rows, cols = (h - k) // s + 1, (w - k) // s + 1
    tokens = [padded[:, :, i * s:i * s + k, j * s:j * s + k].reshape(b, c * k * k)
              for i in range(rows) for j in range(cols)]
    return torch.stack(tokens, dim=1), (rows, cols)


def layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def transformer_layer_reference(x, layer):
    a = layer.attn
    q, k, v = (layer_norm(x, layer.norm1) @ a.qkv.weight.t()).chunk(3, dim=-1)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)
    y = v + (attn @ v) @ a.proj.weight.t() + a.proj.bias
    hidden = F.gelu(layer_norm(y, layer.norm2) @ layer.mlp.fc1.weight.t() + layer.mlp.fc1.bias)
    return y + hidden @ layer.mlp.fc2.weight.t() + layer.mlp.fc2.bias


def performer_layer_reference(x, layer):
    """Per-token loop of the Performer formula, in float64."""
    x = x.double()
    kqv = layer_norm(x, layer.norm1).matmul(layer.kqv.weight.double().t()) + layer.kqv.bias.double()
    k, q, v = kqv.split(layer.out_dim, dim=-1)
    w = layer.w.double()
    m = w.shape[0]

    def phi(t):
        return torch.exp(t @ w.t() - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    qp, kp = phi(q), phi(k)
    out = torch.empty_like(v)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            weights = kp[b] @ qp[b, t]  # similarity of token t to every token
            out[b, t] = (weights[:, None] * v[b]).sum(0) / (weights.sum() + 1e-8)
    y = v + out @ layer.proj.weight.double().t() + layer.proj.bias.double()
    lin1, lin2 = layer.mlp[0], layer.mlp[2]
    hidden = F.gelu(layer_norm(y, layer.norm2) @ lin1.weight.double().t() + lin1.bias.double())
    return (y + hidden @ lin2.weight.double().t() + lin2.bias.double()).float()


def t2t_module_reference(image, module, layer_ref):
    specs = module.specs
    tokens, grid = soft_split_reference(image, *specs[0])
    for index in range(1, len(specs)):
        tokens = layer_ref(tokens, getattr(module, f"attention{index}"))
        b, n, c = tokens.shape
        # Eq. 2: re-structurize token i of the (rows × cols) grid to pixel (i // cols, i % cols).
        restructured = torch.zeros(b, c, *grid)
        for i in range(n):
            restructured[:, :, i // grid[1], i % grid[1]] = tokens[:, i]
        tokens, grid = soft_split_reference(restructured, *specs[index])
    return tokens @ module.project.weight.t() + module.project.bias


@pytest.mark.parametrize("layer,reference", [
    ("transformer", transformer_layer_reference), ("performer", performer_layer_reference)])
@pytest.mark.parametrize("stem,size", [("small", (16, 12)), ("imagenet", (40, 32))])
def test_t2t_module_matches_paper_equations(layer, reference, stem, size):
    model = create_model("t2t_vit_t_14" if layer == "transformer" else "t2t_vit_14", img_size=size, stem=stem,
                         depth=1, num_classes=0).eval()
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = model.tokens_to_token(image)
        want = t2t_module_reference(image, model.tokens_to_token, reference)
    assert got.shape == (2, model.grid_size[0] * model.grid_size[1], 384)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_transformer_t2t_scale_is_input_width():
    model = create_model("t2t_vit_t_14")
    assert model.tokens_to_token.attention1.attn.scale == pytest.approx(147 ** -0.5)
    assert model.tokens_to_token.attention2.attn.scale == pytest.approx(576 ** -0.5)
    assert model.blocks[0].attn.scale == pytest.approx(64 ** -0.5)


def test_performer_projection_is_orthogonal_frozen_and_kept():
    layer = create_model("t2t_vit_7").tokens_to_token.attention1
    w = layer.w
    assert w.shape == (32, 64) and not w.requires_grad
    torch.testing.assert_close(w @ w.t(), 32 * torch.eye(32), rtol=0, atol=1e-4)
    before = w.clone()
    layer.train()
    layer(torch.randn(1, 5, 147))
    assert torch.equal(layer.w, before)


def test_performer_stays_finite_under_bf16_autocast():
    model = create_model("t2t_vit_7", img_size=32, stem="small", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32) * 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()


# ---- fused vs plain attention ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["t2t_vit_t_14", "t2t_vit_14_se", "t2t_vit_16_ghost"])
def test_fused_attention_equals_plain_path(name):
    model = create_model(name, img_size=64, depth=2, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = t2t_vit.configure(model, attention="fused")(x)
        plain = t2t_vit.configure(model, attention="math")(x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_attention_kernel_default_is_the_measured_rule():
    from t2t_vit.layers import AttentionCore

    model = create_model("t2t_vit_t_14", depth=1)
    kernels = [m.attention_kernel for m in model.modules() if isinstance(m, AttentionCore)]
    assert kernels == ["auto"] * 3  # two T2T layers, one block


# ---- position table -------------------------------------------------------------------------

def test_sinusoid_table_formula():
    model = create_model("t2t_vit_7", img_size=32, stem="small")
    table = model.pos_embed[0].double()
    dim = table.shape[1]
    for pos in (0, 1, 17, 64):
        for j in (0, 1, 2, 3, 100, 255):
            angle = pos / 10000 ** (2 * (j // 2) / dim)
            want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(want, abs=1e-6)
    assert not model.pos_embed.requires_grad


def test_dynamic_img_size_resamples_table_bicubically():
    model = create_model("t2t_vit_7", img_size=64, dynamic_img_size=True, num_classes=5).eval()
    x = torch.randn(1, 3, 96, 80)  # 24×20 → 6×5 tokens, table built for 4×4
    grid = model.tokens_to_token.grid((96, 80))
    assert grid == (6, 5)
    cls_row, table = model.pos_embed[:, :1], model.pos_embed[:, 1:]
    image = table.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=grid, mode="bicubic", align_corners=False)
    expected = torch.cat([cls_row, resized.permute(0, 2, 3, 1).reshape(1, 30, -1)], dim=1)
    table_for_grid = fit_position_table(model.pos_embed, grid, model.grid_size, True, model.img_size)
    torch.testing.assert_close(table_for_grid, expected, rtol=1e-5, atol=1e-6)
    assert model(x).shape == (1, 5)


def test_wrong_size_without_dynamic_gives_clear_error():
    model = create_model("t2t_vit_7", img_size=64)
    with pytest.raises(T2TViTError, match="built for 64x64"):
        model(torch.randn(1, 3, 96, 96))


def test_non_square_inputs():
    model = create_model("t2t_vit_t_14", img_size=(224, 160), depth=1, num_classes=3).eval()
    assert model.grid_size == (14, 10)
    assert model.pos_embed.shape == (1, 141, 384)
    assert model(torch.randn(1, 3, 224, 160)).shape == (1, 3)


def test_small_stem_gives_64_tokens_at_32px():
    model = create_model("t2t_vit_7", img_size=32, stem="small", num_classes=10)
    assert model.grid_size == (8, 8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---- every registered model trains ------------------------------------------------------------

@pytest.mark.parametrize("name", REGISTERED)
def test_forward_backward_every_model(name):
    model = create_model(name, img_size=64, num_classes=7, drop_path_rate=0.1)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    out.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # every parameter learns: fixed tables are buffers, not frozen parameters
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---- Token Labeling auxiliary head ---------------------------------------------------------------

def test_token_label_head_adds_half_the_best_patch_token_logits():
    model = small_variant("t2t_vit_24", token_label_head=True).eval()
    state = model.state_dict()
    assert state["aux_head.weight"].shape == (7, 512) and state["aux_head.bias"].shape == (7,)
    assert "aux_head.weight" not in small_variant("t2t_vit_24").state_dict()  # off unless asked
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        cls_logits = feats[:, 0] @ model.head.weight.t() + model.head.bias
        patch_logits = feats[:, 1:] @ model.aux_head.weight.t() + model.aux_head.bias  # (B, 16, 7)
        expected = cls_logits + 0.5 * patch_logits.max(dim=1).values
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x), cls_logits, atol=1e-3)  # the auxiliary term counts
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-5, atol=1e-5)
    model.reset_classifier(0)
    assert "aux_head.weight" not in model.state_dict() and model(x).shape == (3, 512)
    model.reset_classifier(4)
    assert model.state_dict()["aux_head.weight"].shape == (4, 512) and model(x).shape == (3, 4)

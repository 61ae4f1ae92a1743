"""The opt-in paths that change numerics stay close to fp32 eager: bf16 autocast (the Performer's
statistics kept in fp32), ``for_inference`` bf16 models (weights cast once), and torch.compile.

Agreement is judged on full-size features and on held-out digits of a briefly trained model; the
exact fast paths (defaults) are tested in test_fastpaths.py.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import t2t_vit
from t2t_vit.agreement import bf16_agreement, digits_data, train_briefly
from t2t_vit.precision import for_inference
from t2t_vit.t2t_layers import TokenPerformer, performer_attention

from helpers import tiny

torch.set_num_threads(1)  # the machine is shared; tiny sizes are fast on one thread


# ---- bf16 autocast (opt-in) ----------------------------------------------------------------
def test_performer_feature_map_stays_fp32_and_finite_under_bf16():
    torch.manual_seed(0)
    module = TokenPerformer(27, 16).eval()
    x = torch.randn(2, 40, 27) * 30  # large activations: exp would overflow in bf16 statistics
    seen = []
    module.core.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert seen == [(torch.bfloat16, torch.float32)]  # bf16 q/k/v in, feature maps and output in fp32
    q = (x[..., :16] * 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = performer_attention(q, q, q, module.w, 1e-8, "matmul")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(y.float(), module(x), rtol=0.05, atol=0.05)


def assert_tracks_fp32(bf16, fp32):
    """bf16 features follow fp32 token by token (cosine > 0.999, measured 0.99992) and overall
    (relative error < 0.03: bf16 keeps ~3 digits; measured 0.011)."""
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    cosine = F.cosine_similarity(fp32, bf16.float(), dim=-1)  # per token
    assert cosine.min() > 0.999
    assert (fp32 - bf16.float()).norm() / fp32.norm() < 0.03


@pytest.mark.parametrize("precision", ["autocast", "for_inference"])
@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14"])
def test_bf16_full_size_features_track_fp32(name, precision):
    # 224 px: the 3,136-token first T2T layer (Performer or softmax) runs at its real size, under
    # bf16 autocast and as the explicit bf16 model of for_inference.
    torch.manual_seed(0)
    model = t2t_vit.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        fp32 = model.forward_features(x)
        if precision == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model.forward_features(x)
        else:
            bf16 = for_inference(model).forward_features(x)
    assert_tracks_fp32(bf16, fp32)


# ---- for_inference: an explicit bf16 model (opt-in) --------------------------------------------
def test_for_inference_casts_weights_once_and_keeps_performer_projection_fp32():
    model = for_inference(tiny())
    assert not model.training
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    assert {n for n, d in dtypes.items() if d == torch.float32} == {
        "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if not n.endswith(".w"))
    fp32 = tiny().eval()
    torch.testing.assert_close(model.tokens_to_token.attention1.w, fp32.tokens_to_token.attention1.w, rtol=0, atol=0)

    weights = [t for t in model.state_dict(keep_vars=True).values()]
    casts = []

    class WeightCasts(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            if name in ("to", "float", "half", "bfloat16", "type") and any(args[0] is w for w in weights):
                if out is not args[0]:  # a real copy, not a no-op cast to the dtype it already has
                    casts.append(name)
            return out

    x = torch.randn(2, 3, 16, 16)  # float32 images are fine: the model casts its input
    with torch.inference_mode(), WeightCasts():
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert casts == []  # no per-call weight casting


@pytest.mark.e2e
def test_for_inference_bf16_agrees_with_fp32_on_held_out_digits():
    import copy

    model = tiny(embed_dim=64, token_dim=16)
    train_x, train_y, test_x, test_y = digits_data(16)
    train_briefly(model, train_x, train_y, steps=150)
    model.eval()
    with torch.inference_mode():
        fp32 = model(test_x)
        bf16 = for_inference(copy.deepcopy(model))(test_x).float()
    accuracy = (fp32.argmax(-1) == test_y).float().mean().item()
    assert accuracy > 0.7
    assert (fp32.argmax(-1) == bf16.argmax(-1)).float().mean().item() >= 0.99


@pytest.mark.e2e
def test_bf16_agrees_with_fp32_on_held_out_digits():
    # A briefly trained model: its held-out logits have real margins, so agreement is meaningful
    # (at random init the classes are near ties and any rounding flips them).
    model = tiny(embed_dim=64, token_dim=16)
    train_x, train_y, test_x, test_y = digits_data(16)
    train_briefly(model, train_x, train_y, steps=150)
    result = bf16_agreement(model, test_x, test_y)
    assert result["accuracy_fp32"] > 0.7  # it learned something
    assert result["agreement"] >= 0.99
    assert abs(result["accuracy_bf16"] - result["accuracy_fp32"]) <= 0.01
    assert result["max_logit_diff"] < 0.5 * result["median_margin"]  # rounding well below typical decision margins


# ---- torch.compile (opt-in) ----------------------------------------------------------------
def _compile_matches_eager(backend: str) -> None:
    eager = tiny(depth=1)
    compiled_model = tiny(depth=1)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend=backend)
    x = torch.randn(2, 3, 16, 16)
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    compiled(x).square().sum().backward()  # training: gradients through the compiled graph
    eager(x).square().sum().backward()
    for p_c, p_e in zip(compiled_model.parameters(), eager.parameters()):
        if p_e.grad is not None:
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.e2e
def test_compile_matches_eager_graph_capture():
    # aot_eager traces forward and backward graphs like inductor does but skips C++ code generation.
    _compile_matches_eager("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("T2T_SLOW") != "1", reason="inductor compiles C++ for minutes here; T2T_SLOW=1")
def test_compile_inductor_matches_eager():
    _compile_matches_eager("inductor")


def test_for_inference_takes_a_precision_name_and_refuses_others_in_one_line():
    """``for_inference(m, "bf16")`` raised AttributeError ('str' has no is_floating_point)."""
    from t2t_vit import T2TViTError

    model = t2t_vit.create_model("t2t_vit_7", num_classes=3, img_size=32, stem="small", depth=1)
    assert next(for_inference(model, "bf16").parameters()).dtype == torch.bfloat16
    assert model.tokens_to_token.attention1.w.dtype == torch.float32  # the Performer's projection stays fp32
    for bad in ("int8", torch.int8):
        with pytest.raises(T2TViTError, match="precision"):
            for_inference(model, bad)

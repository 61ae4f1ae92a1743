"""Every fast path computes the same function as the reference formulation, within its precision.

Fast paths: fused SDPA attention (and the measured "auto" choice), the matmul-form Performer and
the strided soft split (defaults, exact); bf16 autocast, ``for_inference`` bf16 models and
torch.compile (opt-in, they change numerics). The reference formulation is
``t2t_vit.switchboard.reference_formulation(model)``; the tests also check both against formulas
written out here in float64.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import t2t_vit
from t2t_vit.agreement import bf16_agreement, digits_data, train_briefly
from t2t_vit.layers import Attention, AttentionCore
from t2t_vit.switchboard import choices_of, configure, for_inference, reference_formulation
from t2t_vit.t2t import PerformerCore, SoftSplit, TokenPerformer, performer_attention, performer_features

torch.set_num_threads(1)  # the machine is shared; tiny sizes are fast on one thread

TINY = dict(img_size=16, stem="small", num_classes=10, embed_dim=32, depth=2, num_heads=2, token_dim=16)


def tiny(name: str = "t2t_vit_7", **overrides) -> t2t_vit.T2TViT:
    torch.manual_seed(0)
    return t2t_vit.create_model(name, **{**TINY, **overrides})


# ---- independent float64 formulas ----------------------------------------------------------
def attention64(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v per head, then proj, written out in float64."""
    x = x.double()
    w, heads = module.qkv.weight.double(), module.num_heads
    q, k, v = (x @ w.t()).chunk(3, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)
    probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) * module.scale, dim=-1)
    y = (probs @ split(v)).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    return y @ module.proj.weight.double().t() + module.proj.bias.double()


def performer_attend64(module: TokenPerformer, q, k, v) -> torch.Tensor:
    """y_n = Σ_i φ(q_n)·φ(k_i) v_i / Σ_i φ(q_n)·φ(k_i): the quadratic form the Performer linearises."""
    w = module.w.double()
    phi = lambda t: torch.exp(t.double() @ w.t() - (t.double() ** 2).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])
    scores = phi(q) @ phi(k).transpose(1, 2)  # (B, N, N), fine at test sizes
    return (scores @ v.double()) / (scores.sum(-1, keepdim=True) + module.epsilon)


# ---- exact fast paths (defaults) -----------------------------------------------------------
def test_fast_paths_are_the_defaults_and_precision_stays_fp32():
    model = tiny()
    assert choices_of(model) == {"attention": ["auto"], "soft_split": ["strided"], "performer": ["matmul"]}
    assert type(model) is t2t_vit.T2TViT  # not compiled unless asked
    assert model(torch.randn(2, 3, 16, 16)).dtype == torch.float32  # no autocast unless asked
    reference_formulation(model)
    assert choices_of(model) == {"attention": ["math"], "soft_split": ["unfold"], "performer": ["einsum"]}
    reference_formulation(model, enable=False)
    assert choices_of(model)["performer"] == ["matmul"]


def test_reference_formulation_of_one_model_leaves_other_live_models_alone():
    first, second = tiny(), tiny()
    configure(second, attention="fused")
    before = choices_of(second)
    reference_formulation(first)
    assert choices_of(second) == before == {"attention": ["fused"], "soft_split": ["strided"], "performer": ["matmul"]}
    assert choices_of(tiny()) == {"attention": ["auto"], "soft_split": ["strided"], "performer": ["matmul"]}
    x = torch.randn(2, 3, 16, 16)
    second.eval()
    with torch.no_grad():
        torch.testing.assert_close(second(x), configure(tiny().eval(), attention="fused")(x))


def test_configure_refuses_unknown_choices_and_values():
    with pytest.raises(t2t_vit.T2TViTError, match="unknown execution choice"):
        configure(tiny(), kernel="fused")
    with pytest.raises(t2t_vit.T2TViTError, match="attention='flash' is not one of auto, fused, math"):
        configure(tiny(), attention="flash")


_ENV_DEFAULTS = """
import t2t_vit
from t2t_vit.switchboard import choices_of
model = t2t_vit.create_model("t2t_vit_7", img_size=16, stem="small", depth=1)
print(sorted((k, v) for k, vs in choices_of(model).items() for v in vs))
"""


def test_environment_sets_the_defaults_once_per_process():
    env = {**os.environ, "T2T_VIT_ATTENTION": "math", "T2T_VIT_SOFT_SPLIT": "unfold", "T2T_VIT_PERFORMER": "einsum"}
    done = subprocess.run([sys.executable, "-c", _ENV_DEFAULTS], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('attention', 'math'), ('performer', 'einsum'), ('soft_split', 'unfold')]"
    env["T2T_VIT_ATTENTION"] = "flash"
    done = subprocess.run([sys.executable, "-c", _ENV_DEFAULTS], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "T2T_VIT_ATTENTION: attention='flash' is not one of" in done.stderr


@pytest.mark.parametrize("heads, tokens", [(1, 50), (6, 197)])
def test_fused_attention_matches_plain_and_float64(heads, tokens):
    torch.manual_seed(0)
    module = Attention(48, num_heads=heads).eval()
    x = torch.randn(3, tokens, 48)
    expected = attention64(module, x)
    outputs = {}
    with torch.no_grad():
        for kernel in ("fused", "math", "auto"):
            module.core.attention_kernel = kernel
            outputs[kernel] = module(x)
    for out in outputs.values():
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["fused"], outputs["math"], rtol=1e-5, atol=1e-6)


def test_matmul_performer_matches_einsum_and_quadratic_form():
    torch.manual_seed(0)
    module = TokenPerformer(27, 16).eval()
    q, k, v = (torch.randn(2, 40, 16) * 0.5 for _ in range(3))
    expected = performer_attend64(module, q, k, v)
    fast = module.attend(q, k, v)
    module.core.performer_formulation = "einsum"
    reference = module.attend(q, k, v)
    torch.testing.assert_close(fast.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference.double(), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.integers(1, 7), stride=st.integers(1, 4), padding=st.integers(0, 3),
    channels=st.integers(1, 5), height=st.integers(7, 20), width=st.integers(7, 20), from_tokens=st.booleans(),
)
def test_strided_soft_split_equals_unfold(kernel, stride, padding, channels, height, width, from_tokens):
    padding = min(padding, kernel // 2)
    torch.manual_seed(0)
    if from_tokens:  # a re-structurized token sequence: a non-contiguous (B, C, H, W) view
        image = torch.randn(2, height * width, channels).transpose(1, 2).reshape(2, channels, height, width)
    else:
        image = torch.randn(2, channels, height, width)
    image.requires_grad_(True)
    split = SoftSplit(kernel, stride, padding)
    fast = split(image)
    assert fast.is_contiguous()
    grad_fast, = torch.autograd.grad(fast.square().sum(), image)
    expected = F.unfold(image, kernel, padding=padding, stride=stride).transpose(1, 2)
    grad_expected, = torch.autograd.grad(expected.square().sum(), image)
    assert torch.equal(fast, expected)  # a pure gather: bit-identical
    torch.testing.assert_close(grad_fast, grad_expected)
    split.soft_split_method = "unfold"
    assert torch.equal(split(image), expected)


def test_performer_feature_map_gradient_is_finite_at_zero_tokens():
    # At init, zero-padded corner patches give exactly-zero q/k (zero biases): ‖t‖ has no gradient there.
    module = TokenPerformer(27, 16)
    x = torch.zeros(1, 4, 16, requires_grad=True)
    performer_features(x, module.w).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("attention", ["fused", "auto"])
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_model_fast_path_matches_reference_forward_and_backward(name, attention):
    fast, ref = tiny(name), tiny(name)
    ref.load_state_dict(fast.state_dict())
    configure(fast, attention=attention)
    reference_formulation(ref)
    fast.eval(), ref.eval()  # no dropout, so both see the same function
    x = torch.randn(2, 3, 16, 16)
    out_fast, out_ref = fast(x), ref(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    out_fast.square().sum().backward()
    out_ref.square().sum().backward()
    for (key, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert p_fast.grad is not None, key
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-3, atol=1e-6, msg=key)


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


# ---- benchmark helpers ---------------------------------------------------------------------
# ---- allocator settings of the command line ------------------------------------------------
_FAULTS_PER_FORWARD = """
import resource, sys, torch, t2t_vit
from t2t_vit.runtime import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
model, x = t2t_vit.create_model("t2t_vit_7").eval(), torch.randn(4, 3, 224, 224)
with torch.inference_mode():
    model(x), model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_kept_freed_memory_stops_page_faults_between_forwards():
    def faults(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", _FAULTS_PER_FORWARD, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.strip().splitlines()[-1])

    default, tuned = faults("default"), faults("tuned")
    # glibc alone re-faults ~6,700 pages (26 MB) per forward here; the kept heap almost none.
    assert tuned <= max(600, default / 4), (default, tuned)


def test_command_applies_the_allocator_settings_unless_told_not_to(monkeypatch):
    from t2t_vit import cli, runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("T2T_VIT_MALLOC_TUNING", "0")
    assert runtime.tune_for_command() is False and not calls
    monkeypatch.delenv("T2T_VIT_MALLOC_TUNING")
    assert runtime.tune_for_command() is True and calls == [1]
    monkeypatch.setattr(cli, "tune_for_command", lambda: calls.append(2))
    assert cli.main(["profile", "t2t_vit_7"]) == 0 and calls == [1, 2]


# ---- the measured attention rule -----------------------------------------------------------
def test_auto_kernel_is_never_slower_than_math_in_the_shipped_measurement():
    import json
    from pathlib import Path

    from t2t_vit.switchboard import auto_kernel

    results = json.loads((Path(__file__).parents[1] / "benchmarks" / "results-attention-kernels.json").read_text())
    assert len(results["cases"]) >= 16
    for case in results["cases"]:
        dtype = getattr(torch, case["dtype"])
        choice = auto_kernel("cpu", dtype, case["tokens"], case["grad"])
        chosen_ms = case["fused_ms"] if choice == "fused" else case["math_ms"]
        # Never slower than math, except where fused saves a long training sequence's N×N matrix.
        saves_memory = case["grad"] and case["tokens"] >= results["memory_rule"]["min_tokens"]
        slack = results["memory_rule"]["slack"] if saves_memory else 1.0
        assert chosen_ms <= slack * case["math_ms"], case
        start = results["fused_from"][f"{case['dtype']}/{'train' if case['grad'] else 'infer'}"]
        assert choice == ("fused" if case["tokens"] >= start else "math"), case  # the rule is the measurement's
    assert auto_kernel("cuda", torch.bfloat16, 197, False) == "fused"
    assert auto_kernel("cpu", torch.float16, 197, False) == "math"  # unmeasured: plain matmuls


def test_attention_kernels_reports_each_attention_for_a_case():
    from t2t_vit.switchboard import auto_kernel

    model = t2t_vit.create_model("t2t_vit_t_14", depth=2)
    kernels = t2t_vit.attention_kernels(model, dtype=torch.bfloat16, grad=False)
    assert list(kernels) == ["tokens_to_token.attention1.attn.core", "tokens_to_token.attention2.attn.core",
                             "blocks.0.attn.core", "blocks.1.attn.core"]
    assert kernels["tokens_to_token.attention1.attn.core"] == auto_kernel("cpu", torch.bfloat16, 3136, False)
    assert kernels["blocks.0.attn.core"] == auto_kernel("cpu", torch.bfloat16, 197, False)
    configure(model, attention="fused")
    assert set(t2t_vit.attention_kernels(model).values()) == {"fused"}
    assert next(model.parameters()).device.type == "cpu"  # counted on a meta copy

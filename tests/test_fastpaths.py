"""Every fast path computes the same function as the reference formulation, within its precision.

Fast paths: fused SDPA attention (and the measured "auto" choice), the matmul-form Performer and
the strided soft split (defaults, exact). The opt-in paths that change numerics (bf16 autocast,
``for_inference`` bf16 models, torch.compile) are tested in test_precision.py. The reference
formulation is ``t2t_vit.switchboard.reference_formulation(model)``; the tests also check both
against formulas written out here in float64.
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
from t2t_vit.layers import Attention
from t2t_vit.switchboard import choices_of, configure, reference_formulation
from t2t_vit.t2t import SoftSplit, restructurize
from t2t_vit.t2t_layers import TokenPerformer, performer_features

from helpers import tiny

torch.set_num_threads(1)  # the machine is shared; tiny sizes are fast on one thread


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


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.integers(1, 7), stride=st.integers(1, 4), padding=st.integers(0, 3),
    channels=st.integers(1, 5), height=st.integers(7, 20), width=st.integers(7, 20),
)
def test_pixel_major_split_is_the_unfold_tokens_in_its_order(kernel, stride, padding, channels, height, width):
    padding = min(padding, kernel // 2)
    torch.manual_seed(0)
    image = torch.randn(2, height * width, channels).transpose(1, 2).reshape(2, channels, height, width)
    image.requires_grad_(True)
    tokens, order = SoftSplit(kernel, stride, padding, channels, pixel_major=True).split(image)
    expected = F.unfold(image, kernel, padding=padding, stride=stride).transpose(1, 2)
    # pixel-major feature (row·k + column)·C + channel is channel-major feature (channel·k + row)·k + column
    assert order.tolist() == [(c * kernel + r) * kernel + q for r in range(kernel) for q in range(kernel)
                              for c in range(channels)]
    assert torch.equal(tokens, expected[..., order])
    grad, = torch.autograd.grad(tokens.square().sum(), image)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), image)[0])
    channel_major, none = SoftSplit(kernel, stride, padding).split(image)
    assert none is None and torch.equal(channel_major, expected)


def test_compiled_split_is_one_opaque_copy_equal_to_eager():
    # under torch.compile the pixel-major gather is a custom op (inductor fused it into scalar index code)
    image = torch.randn(2, 16, 12, 12).transpose(2, 3)  # a non-contiguous view, as after restructurize
    torch.library.opcheck(torch.ops.t2t_vit.pixel_major_patches, (image, 3, 2, 1))
    split = SoftSplit(3, 2, 1, 16, pixel_major=True)
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: split.split(x)[0], backend=count_graphs, fullgraph=True)
    out = compiled(image)
    assert torch.equal(out, split.split(image)[0])
    called = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert "t2t_vit.pixel_major_patches" in called
    image.requires_grad_(True)  # a split whose input needs a gradient keeps the differentiable view ops
    compiled(image)
    assert "t2t_vit.pixel_major_patches" not in {
        str(node.target) for node in graphs[-1].graph.nodes if node.op == "call_function"}


class ShiftedLinear(torch.nn.Linear):
    """A LoRA-like wrapper: a Linear whose output also depends on its first input feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5 * x[..., :1]


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_wrapped_or_hooked_t2t_modules_run_as_modules_on_channel_major_tokens(name):
    # pixel-major tokens are read through the parameters only while norm1 and the first projection are
    # torch's own modules without hooks; a wrapper (LoRA, quantization) or a hook sees channel-major tokens
    fast, ref = tiny(name).eval(), tiny(name).eval()
    configure(ref, soft_split="unfold")  # channel-major everywhere: every module runs as a module
    x = torch.randn(2, 3, 16, 16)
    for model in (fast, ref):
        layer = model.tokens_to_token.attention1
        old = layer.first_projection()
        wrapped = ShiftedLinear(old.in_features, old.out_features, bias=old.bias is not None)
        wrapped.load_state_dict(old.state_dict())
        if hasattr(layer, "kqv"):
            layer.kqv = wrapped
        else:
            layer.attn.qkv = wrapped
    seen = []
    fast.tokens_to_token.attention2.norm1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
        t2t = ref.tokens_to_token
        expected = t2t.soft_split1(restructurize(t2t.attention1(t2t.soft_split0(x)), 16, 16))
    assert len(seen) == 1 and torch.allclose(seen[0], expected, atol=1e-5)  # the hook saw channel-major tokens


def test_compiled_model_runs_the_opaque_split_and_equals_eager():
    model = tiny("t2t_vit_7").eval()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = torch.compile(model, backend=record, fullgraph=True)(x)
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    ops = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.count("t2t_vit.pixel_major_patches") == 2  # the two splits that feed a T2T layer


def test_performer_feature_map_gradient_is_finite_at_zero_tokens():
    # At init, zero-padded corner patches give exactly-zero q/k (zero biases): ‖t‖ has no gradient there.
    module = TokenPerformer(27, 16)
    x = torch.zeros(1, 4, 16, requires_grad=True)
    performer_features(x, module.w).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("attention, pixel_norm", [("fused", "layernorm"), ("auto", "layernorm"),
                                                   ("auto", "rmsnorm"), ("auto", "none")])
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_model_fast_path_matches_reference_forward_and_backward(name, attention, pixel_norm):
    fast, ref = tiny(name, t2t_pixel_norm=pixel_norm), tiny(name, t2t_pixel_norm=pixel_norm)
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

"""The attention rule calibrated on the machine that runs it (switchboard.calibrated_kernel): off by
default (the shipped measurement), measured once per shape when on, cached in memory and on disk,
never in training, scripting or compiling. Nothing here asserts a time."""
from __future__ import annotations

import json

import pytest
import torch

import t2t_vit
from t2t_vit import switchboard
from t2t_vit.layers import softmax_attention

torch.set_num_threads(1)
SHAPES = [(1, 2, 65, 16), (2, 1, 197, 8), (1, 1, 3136, 4)]


@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    """Calibration on, its cache in a temporary file, and every timing recorded."""
    monkeypatch.setenv(switchboard.CALIBRATE_ENV, "1")
    monkeypatch.setenv(switchboard.CACHE_ENV, str(tmp_path / "kernels.json"))
    switchboard.forget_calibration()
    timed = []
    real = switchboard.time_kernels

    def recording(*args, **kwargs):
        timed.append(real(*args, **kwargs))
        return timed[-1]

    monkeypatch.setattr(switchboard, "time_kernels", recording)
    yield timed, tmp_path / "kernels.json"
    switchboard.forget_calibration()


def qkv(shape, dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_off_by_default_auto_is_the_shipped_rule(shape, dtype, monkeypatch):
    monkeypatch.delenv(switchboard.CALIBRATE_ENV, raising=False)
    monkeypatch.setattr(switchboard, "time_kernels", lambda *a, **k: pytest.fail("timed while calibration is off"))
    q, k, v = qkv(shape, dtype)
    for grad in (False, True):
        expected = switchboard.auto_kernel("cpu", dtype, shape[-2], grad)
        assert switchboard.calibrated_kernel(q, k, v, 0.25, grad, softmax_attention) == expected


def test_calibrated_choice_is_the_faster_kernel_measured_once_per_shape(calibrating):
    timed, cache = calibrating
    chosen = {}
    for shape in SHAPES + SHAPES:  # every shape twice
        q, k, v = qkv(shape)
        chosen.setdefault(shape, []).append(switchboard.calibrated_kernel(q, k, v, 0.25, False, softmax_attention))
    assert len(timed) == len(SHAPES)  # once per shape
    for shape, times in zip(SHAPES, timed):
        assert set(times) == {"fused", "math"} and all(t > 0 for t in times.values())
        assert chosen[shape] == [min(times, key=times.get)] * 2
    stored = json.loads(cache.read_text())
    assert len(stored) == len(SHAPES) and set(stored.values()) <= {"fused", "math"}
    assert all("|float32|" in key and "threads" in key for key in stored)


def test_the_cache_file_spares_a_new_process_the_measurement(calibrating):
    timed, cache = calibrating
    q, k, v = qkv(SHAPES[0])
    first = switchboard.calibrated_kernel(q, k, v, 0.25, False, softmax_attention)
    switchboard.forget_calibration()  # what a new process starts with
    assert switchboard.calibrated_kernel(q, k, v, 0.25, False, softmax_attention) == first and len(timed) == 1
    # A damaged cache file is measured over, not an error.
    cache.write_text("{not json")
    switchboard.forget_calibration()
    assert switchboard.calibrated_kernel(q, k, v, 0.25, False, softmax_attention) in ("fused", "math")
    assert len(timed) == 2 and json.loads(cache.read_text())


def test_an_unwritable_cache_keeps_the_choice_in_memory(calibrating, monkeypatch, tmp_path):
    timed, _ = calibrating
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv(switchboard.CACHE_ENV, str(blocker / "kernels.json"))  # its folder cannot exist
    q, k, v = qkv(SHAPES[0])
    switchboard.calibrated_kernel(q, k, v, 0.25, False, softmax_attention)
    switchboard.calibrated_kernel(q, k, v, 0.25, False, softmax_attention)
    assert len(timed) == 1 and blocker.read_text() == "x"


def test_training_and_meta_tensors_keep_the_shipped_rule(calibrating):
    timed, _ = calibrating
    q, k, v = qkv((1, 1, 3136, 4), torch.bfloat16)
    assert switchboard.calibrated_kernel(q, k, v, 0.25, True, softmax_attention) == "fused"  # memory, not speed
    meta = torch.empty(1, 2, 65, 16, device="meta")
    assert switchboard.calibrated_kernel(meta, meta, meta, 0.25, False, softmax_attention) == "math"
    assert timed == []


def test_a_calibrated_model_computes_the_same_function_and_scripts(calibrating):
    timed, _ = calibrating
    model = t2t_vit.create_model("t2t_vit_t_14", img_size=32, stem="small", depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        calibrated = model(x)
    assert timed  # the T2T layers' and the blocks' attention shapes were timed
    with torch.no_grad():
        shipped = switchboard.configure(model, attention="math")(x)
        scripted = torch.jit.script(switchboard.configure(model, attention="auto"))(x)
    torch.testing.assert_close(calibrated, shipped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scripted, shipped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("calibrate", ["0", "1"])
def test_compiling_sees_the_shipped_rule_without_a_graph_break(calibrate, monkeypatch):
    """What `t2t-vit bench` reports for compiled cases: dynamo traces the forward in one graph."""
    from t2t_vit.bench.cases import graph_breaks

    monkeypatch.setenv(switchboard.CALIBRATE_ENV, calibrate)
    model = t2t_vit.create_model("t2t_vit_t_14", img_size=32, embed_dim=32, depth=2, num_heads=2, token_dim=16).eval()
    assert graph_breaks(model, torch.randn(2, 3, 32, 32), "fp32") == 0

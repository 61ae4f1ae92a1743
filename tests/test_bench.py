"""The benchmark: every comparison case builds and runs one tiny step, rows and JSON carry their
fields, the kernel column is filled, the ONNX case agrees with eager. Nothing here asserts a time."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from t2t_vit.bench import (
    OTHERS, bench_model, build_case, check_targets, comparison_table, format_table, forward_flops, make_step, profile_bound, run, run_suite,
    time_alternating, training_memory,
)
from t2t_vit.bench import cases as bench_cases
from t2t_vit.bench import suite as bench_suite

torch.set_num_threads(1)  # the machine is shared; tiny sizes are fast on one thread

CPU = torch.device("cpu")
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))  # the "export" extra
ROW_FIELDS = {"model", "task", "batch", "mode", "kernel", "precision", "seconds", "times", "images_per_s", "speedup",
              "speedup_autocast", "flops", "gflops", "peak_mb"}


@pytest.fixture(autouse=True)
def tiny_t2t(monkeypatch):
    """T2T-ViT models of 2 blocks and width 32 (timm's comparison models stay full size, at 32 px)."""
    real = bench_cases.t2t_vit.create_model

    def create(name, **kwargs):
        return real(name, **{**dict(embed_dim=32, depth=2, num_heads=2, token_dim=16), **kwargs})

    monkeypatch.setattr(bench_cases.t2t_vit, "create_model", create)


def test_time_alternating_interleaves_cases():
    order = []
    times = time_alternating({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, CPU)
    assert order == ["a", "b"] * 4  # one warm-up round, then three alternating rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_time_alternating_reports_progress_every_round():
    logged = []
    time_alternating({"a": lambda: None}, 2, CPU, log=logged.append)
    assert [line.split(":")[0].strip() for line in logged] == ["round 1/2", "round 2/2"]


def test_every_comparison_case_runs_one_step_with_a_kernel_and_onnx_agrees():
    logged = []
    modes = ["reference", "reference-bf16", "fp32", "bf16"] + ["onnx"] * HAS_ONNX
    rows = bench_model("t2t_vit_7", modes, [("infer", 2), ("train", 2)],
                       repeats=1, device=CPU, img_size=32, others=OTHERS, log=logged.append)
    cases = {(r["task"], r["model"], r["mode"]) for r in rows}
    ours = {(t, "t2t_vit_7", m) for t in ("infer", "train") for m in ("reference", "reference-bf16", "fp32", "bf16")}
    theirs = {(t, o, m) for t in ("infer", "train") for o in OTHERS for m in ("fp32", "bf16-autocast")}
    theirs |= {("infer", o, "bf16") for o in OTHERS}  # weights cast, like ours
    onnx = {("infer", "t2t_vit_7", "onnx")} if HAS_ONNX else set()  # ONNX Runtime runs inference only
    assert cases == ours | theirs | onnx
    for row in rows:
        assert ROW_FIELDS <= set(row) and row["kernel"]
        assert row["images_per_s"] == pytest.approx(2 / row["seconds"]) and row["flops"] > 0
        assert (row["speedup"] is None) == (row["model"] in OTHERS)
    kernels = {(r["model"], r["mode"]): r["kernel"] for r in rows}
    assert "math" in kernels["t2t_vit_7", "reference"] and "fused" not in kernels["t2t_vit_7", "reference"]
    assert "performer-einsum" in kernels["t2t_vit_7", "reference"] and "performer-matmul" in kernels["t2t_vit_7", "fp32"]
    assert kernels["resnet50", "fp32"] == "none (convolutions)" and kernels["deit_small_patch16_224", "fp32"].endswith("x12")
    assert any("ready in" in line for line in logged) and any("round 1/1" in line for line in logged)
    for row in (r for r in rows if r["mode"] == "onnx"):
        assert row["onnx_max_diff"] < 1e-4  # ONNX Runtime computes what eager fp32 does


def test_bf16_inference_case_runs_bf16_matmuls():
    model = build_case("t2t_vit_7", "bf16", img_size=32)
    step = make_step(model, "bf16", "infer", torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    seen = []
    step.model.apply(lambda m: m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
                     if isinstance(m, torch.nn.Linear) else None)
    step()
    assert torch.bfloat16 in seen


def test_reference_modes_use_the_papers_formulation():
    from t2t_vit.bench import kernel_summary

    for mode in ("reference", "reference-bf16"):
        kernels = kernel_summary("t2t_vit_7", build_case("t2t_vit_7", mode, img_size=32), mode, img_size=32)
        assert "math" in kernels and "fused" not in kernels


def test_compile_bf16_compiles_the_bf16_model_for_inference_and_autocast_for_training(monkeypatch):
    compiled = []
    fake_compile = lambda model, backend, options=None: compiled.append(
        (backend, options, next(model.parameters()).dtype)) or model
    monkeypatch.setattr(torch, "compile", fake_compile)
    images, labels = torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    for task, expected in [("infer", ("inductor", {"freezing": True}, torch.bfloat16)),
                           ("train", ("inductor", None, torch.float32))]:
        model = build_case("t2t_vit_7", "compile-bf16", img_size=32)
        assert compiled == []  # compiled by make_step, as it will run
        seen = []
        model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        make_step(model, "compile-bf16", task, images, labels)()
        assert compiled == [expected] and seen == [torch.bfloat16]  # bf16 weights, or fp32 ones under autocast
        compiled.clear()


def test_forward_flops_count_every_matmul(monkeypatch):
    monkeypatch.undo()  # the full-size model: the authors' code measures 1.147 GMACs for t2t_vit_7 at 224 px
    assert forward_flops("t2t_vit_7") / 2 / 1e9 == pytest.approx(1.147, rel=0.01)
    assert forward_flops("resnet50") / 2 / 1e9 == pytest.approx(4.1, rel=0.03)  # timm's published 4.1 GMACs


def test_profile_names_what_bounds_a_step():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    profile = profile_bound(lambda: [a @ b for _ in range(8)], flops=8 * 2 * 256**3, rate_gflops=100.0)
    assert set(profile["shares"]) == {"matmul", "attention", "copies", "elementwise", "overhead"}
    assert profile["shares"]["matmul"] > 0.5 and profile["bound"].startswith("matmul kernels")
    x = torch.randn(1000)
    profile = profile_bound(lambda: [x.add(1) for _ in range(200)], flops=1.0, rate_gflops=100.0)
    assert "matmul kernels" not in profile["bound"]


def test_suite_json_and_table_have_floors_kernels_and_bounds(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_suite, "matmul_rate", lambda dtype, device: 50.0)
    result = run_suite(["t2t_vit_7"], ["reference", "bf16"], [("infer", 8)], repeats=1, memory_batch=None, device=CPU,
                       log=lambda s: None, others=("resnet50",), profile=True, img_size=32)
    for row in result["rows"]:
        assert {"floor_s", "of_floor", "of_peak", "profile"} <= set(row) and row["kernel"]
        assert row["of_floor"] == pytest.approx(row["seconds"] / row["floor_s"])
    table = format_table(result)
    assert table.count("\n| ") == 5 and "bounded by" in table and "none (convolutions)" in table
    assert "resnet50 fp32" in comparison_table(result) and "infer 8" in comparison_table(result)
    assert result["targets"][-1]["target"].startswith("every case") and result["targets"][-1]["met"]
    json.dumps(result)  # everything in it is plain data


def test_targets_are_read_from_rows_and_memory():
    rows = [dict(model="t2t_vit_t_14", task="infer", batch=8, mode=mode, seconds=s)
            for mode, s in (("reference", 3.0), ("fp32", 1.5))]
    memory = [dict(model="t2t_vit_t_14", mode="bf16", ratio=0.6)]
    found = {t["target"].split(" vs")[0]: t for t in check_targets(dict(rows=rows, memory=memory))}
    assert found["T2T-ViTt-14 fp32 inference"]["measured"] == 2.0 and found["T2T-ViTt-14 fp32 inference"]["met"]
    assert not found["T2T-ViTt-14 bf16 training-step memory"]["met"]


def test_out_of_memory_case_is_reported_and_the_others_go_on(monkeypatch):
    real = bench_suite.warm_case

    def warm(name, mode, *args):
        if mode == "fp32":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(name, mode, *args)

    monkeypatch.setattr(bench_suite, "warm_case", warm)
    logged = []
    rows = bench_model("t2t_vit_7", ["reference", "fp32"], [("infer", 1)], repeats=1, device=CPU, img_size=32,
                       log=logged.append)
    assert [(r["mode"], r.get("out_of_memory", False)) for r in rows] == [("fp32", True), ("reference", False)]
    assert "t2t_vit_7 infer batch 1 fp32: out of memory" in logged
    assert "out of memory" in format_table(dict(rows=rows, memory=[]))


def test_presets(monkeypatch, tmp_path):
    import argparse

    from t2t_vit.bench import _preset, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    quick = _preset(parser.parse_args(["--quick"]))
    assert quick["memory_batch"] is None and not quick["profile"] and quick["agreement_steps"] == 0
    assert "onnx" not in quick["modes"] and quick["tasks"] == [("infer", 8), ("train", 8)]
    assert quick["models"] == ("t2t_vit_14",) and quick["others"] == ("deit_small_patch16_224",)
    full = _preset(parser.parse_args([]))
    assert {"reference", "reference-bf16", "fp32", "bf16", "onnx"} <= set(full["modes"]) and full["profile"]
    assert full["tasks"] == [("infer", 1), ("infer", 8), ("infer", 32), ("train", 8)] and full["others"] == OTHERS
    gpu = _preset(parser.parse_args(["--gpu"]))
    assert "onnx" not in gpu["modes"] and "compile-bf16" in gpu["modes"] and gpu["compile_batches"] is None
    assert set(gpu["compile_models"]) == set(gpu["models"])
    named = _preset(parser.parse_args(["--models", "t2t_vit_14", "--modes", "compile-bf16"]))
    assert list(named["compile_models"]) == ["t2t_vit_14"]  # the model asked for is compiled, not a demo one
    runtimes = _preset(parser.parse_args(["--quick", "--runtime", "openvino", "onnxruntime"]))
    assert runtimes["modes"][-5:] == ["openvino", "openvino-bf16", "openvino-int8", "onnx", "onnx-int8"]


def test_command_writes_json(monkeypatch, tmp_path, capsys):
    import argparse

    from t2t_vit.bench import add_arguments

    monkeypatch.setattr(bench_suite, "matmul_rate", lambda dtype, device: 50.0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--quick", "--models", "t2t_vit_7", "--others", "--modes", "fp32", "--tasks", "infer:1",
                              "--repeats", "1", "--img-size", "32", "--json", str(out)])
    assert run(args) == 0
    result = json.loads(out.read_text())
    assert {"meta", "matmul_gflops", "rows", "memory", "agreement"} <= set(result)
    isa = result["meta"]["cpu_isa"]  # what bf16/int8 speed depends on, recorded with the numbers
    assert {"avx512_bf16", "amx_bf16", "amx_int8"} <= set(isa) and isinstance(isa["avx512_bf16"], bool)
    assert [r["mode"] for r in result["rows"]] == ["reference", "fp32"]
    assert "t2t_vit_7 infer:1" in capsys.readouterr().out


@pytest.mark.e2e
def test_training_memory_runs_in_a_fresh_process():
    figures = training_memory("t2t_vit_7", "fp32", batch=2, img_size=32)
    # Weights (4.3M fp32 = 17 MB) + gradients + momentum are at least ~50 MB above the baseline.
    assert figures["peak_mb"] >= figures["baseline_mb"] + 40
    assert figures["step_mb"] == pytest.approx(figures["peak_mb"] - figures["baseline_mb"])


def test_onnx_case_without_onnxruntime_is_one_line_naming_the_extra(monkeypatch):
    import sys

    from t2t_vit.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(MissingDependency, match=r"pip install 't2t-vit\[export\]'"):
        bench_cases._onnx_step(torch.nn.Identity(), torch.zeros(1), "unused")


def test_quick_prints_one_table_no_unmeasured_target_and_writes_no_file(monkeypatch, tmp_path, capsys):
    """bench --quick: the table once, no 'bounded by' column left empty, no target it did not
    measure reported as missed, and nothing written unless --json names a file."""
    import argparse

    from t2t_vit.bench import add_arguments

    monkeypatch.setattr(bench_suite, "matmul_rate", lambda dtype, device: 50.0)
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--quick", "--models", "t2t_vit_7", "--others", "--modes", "fp32", "--tasks", "infer:1",
                              "train:1", "--repeats", "1", "--img-size", "32"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert out.count("| model | task | batch | mode |") == 1 and "bounded by" not in out
    assert "MISSED" not in out and "every case within" not in out
    assert list(tmp_path.iterdir()) == []


HAS_OPENVINO = importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None


@pytest.mark.e2e
@pytest.mark.skipif(not (HAS_ONNX and HAS_OPENVINO), reason="needs the export and openvino extras")
def test_runtime_cases_run_in_their_own_processes_beside_deit():
    import sys

    loaded_before = "openvino" in sys.modules
    logged = []
    rows = bench_model("t2t_vit_7", ["fp32", "openvino", "openvino-int8", "onnx-int8"], [("infer", 2), ("train", 2)],
                       repeats=1, device=CPU, img_size=32, others=("deit_small_patch16_224",), log=logged.append)
    cases = {(r["model"], r["task"], r["mode"]): r for r in rows}
    for model in ("t2t_vit_7", "deit_small_patch16_224"):
        for mode in ("openvino", "openvino-int8", "onnx-int8"):
            row = cases[model, "infer", mode]  # inference only: no train rows for runtimes
            assert row["images_per_s"] > 0 and row["kernel"].split()[0] in ("openvino", "onnxruntime")
            assert (model, "train", mode) not in cases
        assert cases[model, "infer", "openvino"]["max_diff"] < 1e-3  # f32 OpenVINO computes what eager does
    assert loaded_before or "openvino" not in sys.modules  # never imported into the timing process
    assert any("in its own process" in line for line in logged)
    table = format_table(dict(rows=rows, memory=[]))
    assert "openvino int8+bf16" in table and "onnxruntime int8" in table

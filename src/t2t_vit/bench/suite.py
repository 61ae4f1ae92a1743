"""The benchmark suite: interleaved groups of cases, rows with ratios and floors, the table."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterable

import torch

import t2t_vit
from t2t_vit.agreement import digits_agreement
from t2t_vit.bench.cases import (
    AGREEMENT_MODEL, COMPILE_BATCH, OTHER_INFER_MODES, OTHER_MODES, OTHERS, RUNTIME_MODES, build_other, precision_of,
    warm_case,
)
from t2t_vit.bench.measure import cpu_isa, forward_flops, matmul_rate, profile_bound, time_alternating, training_memory
from t2t_vit.errors import T2TViTError
from t2t_vit.runtime import malloc_tuned

RATE_KEYS = {"fp32": "float32", "bf16": "bfloat16"}


def _group_cases(name: str, modes: Iterable[str], others: Iterable[str], task: str, batch: int,
                 compile_batches: Iterable[int] | None, device: torch.device) -> list[tuple[str, str]]:
    """(model, mode) of every case timed together for one (task, batch)."""
    cases = []
    for mode in modes:
        if mode.startswith("compile") and compile_batches is not None and batch not in compile_batches:
            continue
        if (mode == "onnx" or mode in RUNTIME_MODES) and (task != "infer" or device.type != "cpu"):
            continue  # ONNX Runtime and OpenVINO run inference, on the CPU
        cases.append((name, mode))
    # timm's models also on the runtimes asked for, and compiled for inference (not every GPU training size)
    beside = [m for _, m in cases if m in RUNTIME_MODES or (m.startswith("compile") and task == "infer")]
    own = OTHER_INFER_MODES if task == "infer" else OTHER_MODES
    return cases + [(other, mode) for other in others for mode in (*own, *beside)]


def _runtime_cases(cases, task, batch, img_size, repeats, log) -> tuple[dict, dict, list[dict]]:
    """Time each runtime case in its own process: (key -> case, key -> times, failed rows)."""
    from t2t_vit.bench.runtimes import runtime_kernel, time_runtime_case

    warmed, times, failed = {}, {}, []
    for model, mode in cases:
        key = f"{model} {mode}"
        try:
            found = time_runtime_case(model, mode, batch, img_size, repeats)
        except T2TViTError as err:
            log(f"  {key}: {err}")
            failed.append(dict(model=model, task=task, batch=batch, mode=mode, failed=str(err)))
            continue
        log(f"  {key}: built in {found['build_s']:.1f} s in its own process, max |Δ| vs eager {found['max_diff']:.2e}")
        warmed[key] = dict(model=model, mode=mode, kernel=runtime_kernel(mode), peak_mb=None,
                           max_diff=found["max_diff"])
        times[key] = found["times"]
    return warmed, times, failed


def _warm_group(cases, task, bases, images, labels, img_size, folder, log) -> tuple[dict, list[dict]]:
    """Warm every case; (key -> warmed case, rows of cases that ran out of memory)."""
    warmed, failed = {}, []
    for model, mode in cases:
        start = time.perf_counter()
        try:
            warmed[f"{model} {mode}"] = dict(model=model, mode=mode, **warm_case(
                model, mode, task, bases[model], images, labels, img_size, folder))
            log(f"  {model} {mode}: ready in {time.perf_counter() - start:.1f} s")
            continue
        except torch.OutOfMemoryError:
            pass  # released only once the traceback (and the half-built case it holds) is gone
        log(f"{model} {task} batch {len(images)} {mode}: out of memory")
        failed.append(dict(model=model, task=task, batch=len(images), mode=mode, out_of_memory=True))
        _release(images.device)
    return warmed, failed


def bench_model(
    name: str, modes: Iterable[str], tasks: Iterable[tuple[str, int]], repeats: int, device: torch.device,
    img_size: int = 224, compile_batches: Iterable[int] | None = (COMPILE_BATCH,), log: Callable[[str], None] = print,
    others: Iterable[str] = (), rates: dict[str, float] | None = None,
) -> list[dict]:
    """Time every (task, batch) of ``name`` in every mode, with ``others`` (timm models) in the same
    alternation; rows with ratios to the reference in fp32 and under bf16 autocast.

    Compiled modes run only at ``compile_batches`` (None: every batch). With ``rates`` (matmul
    GFLOP/s per dtype) each case is also run once under ``torch.profiler`` to say what bounds it. On a GPU each
    row has ``peak_mb`` (``torch.cuda.max_memory_allocated`` while the case was built and warmed); a
    case that runs out of memory is reported as such and the others go on.
    """
    torch.manual_seed(0)
    log(f"{name}: building {', '.join((name, *others))} at {img_size} px, counting FLOPs")
    bases = {name: t2t_vit.create_model(name, img_size=img_size), **{o: build_other(o, img_size) for o in others}}
    flops = {model: forward_flops(model, img_size, base) for model, base in bases.items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="t2t-vit-bench-") as folder:
        for task, batch in tasks:
            log(f"{name} {task}:{batch}")
            images = torch.randn(batch, 3, img_size, img_size, device=device)
            labels = torch.randint(0, 1000, (batch,), device=device)
            cases = _group_cases(name, modes, others, task, batch, compile_batches, device)
            in_process = [c for c in cases if c[1] not in RUNTIME_MODES]
            warmed, failed = _warm_group(in_process, task, bases, images, labels, img_size, folder, log)
            rows += failed
            # counting graph breaks resets dynamo, dropping compiled cases warmed before: warm them again
            recompile = any("graph_breaks" in c for c in warmed.values())
            times = time_alternating({k: c["step"] for k, c in warmed.items()}, repeats, device, warm_up=recompile,
                                     log=log)
            elsewhere = _runtime_cases([c for c in cases if c[1] in RUNTIME_MODES], task, batch, img_size, repeats, log)
            warmed.update(elsewhere[0])
            times.update(elsewhere[1])
            rows += elsewhere[2]
            group = _rows(name, task, batch, warmed, times, flops)
            if rates:
                _profile_rows(group, warmed, rates, log)
            rows += group
            for r in group:  # the group's results now, in case the run is cut short (the table comes at the end)
                log(f"  {r['model']} {r['mode']}: {1000 * r['seconds']:.1f} ms, {r['images_per_s']:.1f} images/s")
            del warmed
            _release(device)
    return rows


def _rows(name: str, task: str, batch: int, warmed: dict, times: dict, flops: dict) -> list[dict]:
    median = {key: statistics.median(seconds) for key, seconds in times.items()}
    ref, ref_bf16 = median.get(f"{name} reference", float("nan")), median.get(f"{name} reference-bf16", float("nan"))
    rows = []
    for key, seconds in times.items():
        case, t = warmed[key], median[key]
        step_flops = flops[case["model"]] * batch * (3 if task == "train" else 1)  # backward ≈ 2× forward
        ours = case["model"] == name
        row = dict(model=case["model"], task=task, batch=batch, mode=case["mode"], kernel=case["kernel"],
                   precision=precision_of(case["mode"]), seconds=t, times=seconds, images_per_s=batch / t,
                   speedup=ref / t if ours else None, speedup_autocast=ref_bf16 / t if ours else None,
                   flops=step_flops, gflops=step_flops / t / 1e9, peak_mb=case["peak_mb"])
        for field in ("onnx_max_diff", "max_diff", "graph_breaks"):
            if field in case:
                row[field] = case[field]
        rows.append(row)
    return rows


def _profile_rows(rows: list[dict], warmed: dict, rates: dict, log: Callable[[str], None]) -> None:
    """Add ``profile`` (shares of the step per kind of op, and what bounds it) to each row."""
    for row in rows:
        rate = rates[RATE_KEYS[row["precision"]]]
        if row["mode"] == "onnx" or row["mode"] in RUNTIME_MODES:
            row["profile"] = dict(bound=f"{row['kernel'].split()[0]}'s kernels (outside torch.profiler)")
            continue
        row["profile"] = profile_bound(warmed[f"{row['model']} {row['mode']}"]["step"], row["flops"], rate)
        log(f"  profiled {row['model']} {row['mode']}: {row['profile']['bound']}")


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _memory_rows(name: str, modes: Iterable[str], batch: int, img_size: int, log: Callable[[str], None]) -> list[dict]:
    """Peak training-step memory of ``name`` in each eager mode, each in a fresh process, with the
    ratio to the reference."""
    memory = []
    for mode in modes:
        log(f"  training memory {name} {mode} (fresh process)")
        memory.append(dict(model=name, mode=mode, batch=batch, **training_memory(name, mode, batch, img_size)))
        log(f"  step MB {memory[-1]['step_mb']:.0f}, peak RSS MB {memory[-1]['peak_mb']:.0f}")
    ref = next((m["step_mb"] for m in memory if m["mode"] == "reference"), float("nan"))
    for m in memory:
        m["ratio"] = m["step_mb"] / ref
    return memory


def run_suite(
    models: Iterable[str], modes: Iterable[str], tasks: Iterable[tuple[str, int]], repeats: int,
    memory_batch: int | None, device: torch.device, log: Callable[[str], None] = print,
    compile_models: Iterable[str] | None = None, agreement_steps: int = 0,
    compile_batches: Iterable[int] | None = (COMPILE_BATCH,), others: Iterable[str] = OTHERS, profile: bool = True,
    img_size: int = 224,
) -> dict:
    """The whole benchmark as one dict: matmul rates, timing rows (``others`` timed beside the first
    model), training-memory rows (CPU), floors and, optionally, bf16 agreement. Compiled modes run
    for ``compile_models`` (None: every model)."""
    modes, started = list(modes), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_at_start = (os.getloadavg() if hasattr(os, "getloadavg") else None, other_python_processes())
    rates = {RATE_KEYS[p]: matmul_rate(dtype, device) for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    log(f"matmul rate: fp32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f} GFLOP/s")
    rows, memory = [], []
    for index, name in enumerate(models):
        start = time.perf_counter()
        model_modes = [m for m in modes if not m.startswith("compile") or compile_models is None or name in compile_models]
        rows += bench_model(name, model_modes, tasks, repeats, device, img_size=img_size, compile_batches=compile_batches, log=log,
                            others=others if index == 0 else (), rates=rates if profile else None)
        if memory_batch and device.type == "cpu":
            memory += _memory_rows(name, [m for m in ("reference", "fp32", "bf16") if m in modes], memory_batch, img_size, log)
        log(f"{name}: {time.perf_counter() - start:.0f} s")
    for dtype, key in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):  # best of start and end
        rates[key] = max(rates[key], matmul_rate(dtype, device))
    for row in rows:
        if "gflops" in row and "int8" not in row["mode"]:  # no int8 matmul rate is measured: no floor
            rate = rates[RATE_KEYS[row["precision"]]]
            row["of_peak"] = row["gflops"] / rate
            row["floor_s"] = row["flops"] / rate / 1e9
            row["of_floor"] = row["seconds"] / row["floor_s"]
    agreement = digits_agreement(AGREEMENT_MODEL, agreement_steps) if agreement_steps else None
    if agreement:
        log(f"bf16 vs fp32 top-1 agreement: {agreement}")
    result = dict(meta=dict(started=started, loadavg_at_start=load_at_start[0],
                            other_python_processes_at_start=load_at_start[1], **_meta(device)), matmul_gflops=rates, rows=rows, memory=memory,
                  agreement=agreement)
    result["targets"] = check_targets(result)
    return result


def other_python_processes() -> int | None:
    """Python processes running on this machine besides this one (None where /proc is missing):
    the other jobs that share its CPU."""
    if not os.path.isdir("/proc"):
        return None
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                first = cmdline.read().split(b"\0")[0]
        except OSError:
            continue  # ended while we looked
        count += int(pid) != os.getpid() and b"python" in os.path.basename(first)
    return count


def _meta(device: torch.device) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(other_python_processes=other_python_processes(), finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), command=" ".join(sys.argv),
                torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(), device=str(device),
                processor=platform.processor() or platform.machine(), cpu_isa=cpu_isa(), loadavg=load,
                malloc_tuned=malloc_tuned(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)


def _ratio(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.2f}"  # None or NaN: no such baseline


def format_table(result: dict) -> str:
    """Markdown tables of the timing rows and the memory rows."""
    gpu = any(r.get("peak_mb") is not None for r in result["rows"])
    profiled = any("profile" in r for r in result["rows"])  # no profile (--quick): no empty column
    lines = ["| model | task | batch | mode | attention kernel | ms/step | images/s | × ref fp32 | × ref bf16 "
             "| floor ms | × floor |" + (" bounded by |" if profiled else "") + (" peak MB |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if profiled else "") + ("---|" if gpu else "")]
    for r in result["rows"]:
        head = f"| {r['model']} | {r['task']} | {r['batch']} | {r['mode']} |"
        if r.get("failed"):
            lines.append(head + " | failed ||||||" + ("|" if profiled else "") + ("|" if gpu else ""))
            continue
        if r.get("out_of_memory"):
            lines.append(head + " | out of memory ||||||" + ("|" if profiled else "") + ("|" if gpu else ""))
            continue
        floor = f"{1000 * r['floor_s']:.1f} | {r['of_floor']:.1f}" if "floor_s" in r else "— | —"
        bound = f" {r.get('profile', {}).get('bound', '')} |" if profiled else ""
        kernel = r["kernel"] + (f" ({r['graph_breaks']} graph breaks)" if "graph_breaks" in r else "")
        lines.append(f"{head} {kernel} | {1000 * r['seconds']:.1f} | {r['images_per_s']:.1f} | "
                     f"{_ratio(r['speedup'])} | {_ratio(r.get('speedup_autocast'))} | {floor} |{bound}"
                     + (f" {r['peak_mb']:.0f} |" if gpu else ""))
    if result["memory"]:
        lines += ["", "| model | train batch | mode | peak RSS MB | step MB | × reference |", "|---|---|---|---|---|---|"]
        for m in result["memory"]:
            lines.append(f"| {m['model']} | {m['batch']} | {m['mode']} | {m['peak_mb']:.0f} | {m['step_mb']:.0f} | {m['ratio']:.2f} |")
    agreement = result.get("agreement")
    if agreement:
        lines += ["", f"bf16 vs fp32 top-1 agreement, {agreement['model']} trained {agreement['steps']} steps on digits at "
                  f"{agreement['img_size']} px, {agreement['images']} held-out images: {100 * agreement['agreement']:.1f}% "
                  f"(accuracy fp32 {100 * agreement['accuracy_fp32']:.1f}%, bf16 {100 * agreement['accuracy_bf16']:.1f}%; "
                  f"max |Δlogit| {agreement['max_logit_diff']:.3f}, median top-2 margin {agreement['median_margin']:.2f})"]
    return "\n".join(lines)


def comparison_table(result: dict) -> str:
    """Images/s of every case side by side, one line per (task, batch): the headline comparison."""
    cases = list(dict.fromkeys((r["model"], r["mode"]) for r in result["rows"] if "images_per_s" in r))
    groups = list(dict.fromkeys((r["task"], r["batch"]) for r in result["rows"]))
    speed = {(r["task"], r["batch"], r["model"], r["mode"]): r["images_per_s"] for r in result["rows"] if "images_per_s" in r}
    lines = ["| images/s | " + " | ".join(f"{m} {mode}" for m, mode in cases) + " |", "|---|" + "---|" * len(cases)]
    for task, batch in groups:
        cells = [f"{speed[task, batch, m, mode]:.1f}" if (task, batch, m, mode) in speed else "—" for m, mode in cases]
        lines.append(f"| {task} {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the CPU suite's acceptance targets (batch 8): data for the report, which checks them and
# docs/benchmarks.md ("Targets") records against a run ----------------------------------------
# speed: (what, model, task, batch, mode, against, at least); "against" is a mode of the same model
SPEED_TARGETS = (
    ("T2T-ViT-14 bf16 inference vs the reference fp32", "t2t_vit_14", "infer", 8, "bf16", "reference", 4.0),
    ("T2T-ViT-14 bf16 inference vs the reference under the same autocast", "t2t_vit_14", "infer", 8, "bf16",
     "reference-bf16", 1.25),
    ("T2T-ViTt-14 fp32 inference vs the reference fp32", "t2t_vit_t_14", "infer", 8, "fp32", "reference", 1.5),
    ("T2T-ViTt-14 bf16 training step vs the reference fp32 step", "t2t_vit_t_14", "train", 8, "bf16", "reference", 2.0),
)
# memory: (what, model, mode, at most) for the training step's memory over the reference fp32 step's
MEMORY_TARGET = ("T2T-ViTt-14 bf16 training-step memory vs the reference fp32", "t2t_vit_t_14", "bf16", 0.5)
FLOOR_TARGET = 2.0  # every case within this multiple of its compute floor, or what bounds it measured


def check_targets(result: dict) -> list[dict]:
    """The CPU targets (batch 8) found in ``result``: measured ratio and whether it is met."""
    seconds = {(r["model"], r["task"], r["batch"], r["mode"]): r["seconds"] for r in result["rows"] if "seconds" in r}
    found = []
    for what, model, task, batch, mode, against, least in SPEED_TARGETS:
        if (model, task, batch, mode) in seconds and (model, task, batch, against) in seconds:
            ratio = seconds[model, task, batch, against] / seconds[model, task, batch, mode]
            found.append(dict(target=f"{what} ≥ {least}×", measured=ratio, met=ratio >= least))
    memory = {(m["model"], m["mode"]): m["ratio"] for m in result.get("memory", [])}
    what, model, mode, most = MEMORY_TARGET
    if (model, mode) in memory:
        ratio = memory[model, mode]
        found.append(dict(target=f"{what} ≤ {most}×", measured=ratio, met=ratio <= most))
    rows = [r for r in result["rows"] if "of_floor" in r]
    if rows and any("profile" in r for r in rows):  # without a profile (--quick) the bound is not measured
        unexplained = [r for r in rows if r["of_floor"] > FLOOR_TARGET and "bound" not in r.get("profile", {})]
        found.append(dict(target=f"every case within {FLOOR_TARGET:g}× its compute floor, or what bounds it measured",
                          measured=sum(r["of_floor"] <= FLOOR_TARGET for r in rows) / len(rows), met=not unexplained))
    return found

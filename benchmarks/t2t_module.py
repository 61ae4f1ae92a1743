"""What the T2T module costs of the whole forward, per runtime: prints a table, writes JSON.

    PYTHONPATH=src python benchmarks/t2t_module.py --json benchmarks/results-t2t-module.json

Each (model, runtime) case runs in its own interpreter (OpenVINO's spinning worker threads slow
PyTorch in the same process); inside it the whole model and its T2T module alone (the same
weights, the same runtime) are timed in alternating rounds, so the share compares like with like.
Cases: PyTorch eager bf16 (``for_inference``), the same under ``torch.compile`` (inductor, weight
freezing), OpenVINO f32 and bf16, and the paper's formulation under bf16 autocast for scale.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("reference-bf16", "bf16", "compile-bf16", "openvino", "openvino-bf16")
MODELS = ("t2t_vit_14", "t2t_vit_t_14")


def _build(name: str, case: str, batch: int):
    """(whole, module, input) callables of ``case``: each takes the input and runs one forward."""
    import torch

    import t2t_vit
    from t2t_vit.bench.cases import compile_for_inference
    from t2t_vit.precision import autocast, for_inference
    from t2t_vit.switchboard import reference_formulation

    torch.manual_seed(0)
    model = t2t_vit.create_model(name).eval()
    images = torch.randn(batch, 3, 224, 224)
    if case.startswith("openvino"):
        import openvino as ov

        from t2t_vit.deploy.openvino import compile_graph

        precision = "bf16" if case.endswith("bf16") else "fp32"
        with torch.no_grad():
            whole = compile_graph(ov.convert_model(model, example_input=images), precision)
            module = compile_graph(ov.convert_model(model.tokens_to_token, example_input=images), precision)
        return whole, module, images.numpy()
    if case == "reference-bf16":
        reference_formulation(model)

        def under_autocast(run):
            def autocast_run(x):
                with autocast(torch.device("cpu"), "bf16"):
                    return run(x)
            return autocast_run

        return under_autocast(model), under_autocast(model.tokens_to_token), images
    model = for_inference(model, torch.bfloat16)
    whole, module = model, model.tokens_to_token
    if case == "compile-bf16":  # as `t2t-vit bench` compiles its cases
        cpu = torch.device("cpu")
        whole, module = compile_for_inference(model, cpu), compile_for_inference(model.tokens_to_token, cpu)
    return whole, module, images.to(torch.bfloat16)


def _child(name: str, case: str, batch: int, rounds: int, threads: int) -> None:
    """Runs in a fresh interpreter: build, warm up, time whole and module alternately; JSON out."""
    import torch

    from t2t_vit.runtime import tune_for_command

    tune_for_command()  # as `t2t-vit bench` runs
    torch.set_num_threads(threads)
    whole, module, images = _build(name, case, batch)
    times = {"whole": [], "t2t": []}
    with torch.inference_mode():
        for step in range(rounds + 2):  # two warm-up rounds (and compilation)
            for key, run in (("whole", whole), ("t2t", module)):
                start = time.perf_counter()
                run(images)
                if step >= 2:
                    times[key].append(time.perf_counter() - start)
    print(json.dumps(times))


def measure(name: str, case: str, batch: int, rounds: int, threads: int) -> dict:
    """One case in a fresh interpreter: median ms of the whole forward and of the T2T module."""
    code = f"import benchmarks.t2t_module as b; b._child({name!r}, {case!r}, {batch}, {rounds}, {threads})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # absolute, so the child imports the t2t_vit the caller meant (it runs in this folder)
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([root, *paths])})
    if done.returncode != 0:
        return dict(model=name, case=case, failed=(done.stderr.strip().splitlines() or ["no output"])[-1])
    times = json.loads(done.stdout.strip().splitlines()[-1])
    whole, t2t = (statistics.median(times[k]) * 1000 for k in ("whole", "t2t"))
    return dict(model=name, case=case, whole_ms=round(whole, 1), t2t_ms=round(t2t, 1), t2t_share=round(t2t / whole, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the rows and the machine here")
    args = parser.parse_args()
    from t2t_vit.bench.measure import cpu_isa

    rows = []
    print("| model | case | whole ms | T2T module ms | T2T share |\n|---|---|---|---|---|")
    for name in args.models:
        for case in args.cases:
            row = measure(name, case, args.batch, args.rounds, args.threads)
            rows.append(row)
            if "failed" in row:
                print(f"| {name} | {case} | failed: {row['failed']} | | |")
            else:
                print(f"| {name} | {case} | {row['whole_ms']} | {row['t2t_ms']} | {row['t2t_share']:.0%} |")
    if args.json:
        import t2t_vit

        machine = dict(cpu=cpu_isa(), threads=args.threads, batch=args.batch, rounds=args.rounds, t2t_vit=t2t_vit.__file__,
                       load_average=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        with open(args.json, "w") as out:
            json.dump(dict(machine=machine, rows=rows), out, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Top-1 agreement with fp32 PyTorch of every runtime and precision, on the 360 held-out digits.

As for the bf16 agreement (``t2t_vit.agreement``): a random-init model has near-tied logits, so
the architecture is first trained briefly on the digits of ``t2t-vit train`` (120 steps at 16 px,
small stem), then every case classifies the held-out 20% and is compared with fp32 eager. int8
cases are calibrated on 300 training digits (images the evaluation never sees), with the whole
graph quantized ("int8") or the T2T module kept float ("int8, T2T float", the library's default:
``t2t_vit.deploy.KEEP_FLOAT``). Prints a table, writes JSON.

    python benchmarks/deploy_agreement.py [--model t2t_vit_7] [--steps 120] [--json benchmarks/results-deploy-agreement.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import t2t_vit
from t2t_vit import deploy
from t2t_vit.agreement import digits_data, train_briefly
from t2t_vit.switchboard import for_inference

T2T_FLOAT = deploy.KEEP_FLOAT  # the T2T module (OpenVINO node names, ONNX module paths)
CASES = (  # (runtime, precision, int8, keep float)
    ("torch", "bf16", False, ()),
    ("openvino", "fp32", False, ()),
    ("openvino", "bf16", False, ()),
    ("openvino", "fp32", True, ()),
    ("openvino", "fp32", True, T2T_FLOAT),
    ("openvino", "bf16", True, ()),
    ("openvino", "bf16", True, T2T_FLOAT),
    ("onnxruntime", "fp32", False, ()),
    ("onnxruntime", "fp32", True, ()),
    ("onnxruntime", "fp32", True, T2T_FLOAT),
)


def case_name(runtime: str, precision: str, int8: bool, keep: tuple) -> str:
    what = f"int8 (+{precision})" if int8 else precision
    return f"{runtime} {what}" + (", T2T float" if keep else "")


@torch.inference_mode()
def logits_of(model: torch.nn.Module, images: torch.Tensor, runtime: str, precision: str, int8: bool,
              keep: tuple, calibration: list) -> torch.Tensor:
    if runtime == "torch":
        low = for_inference(_copy(model), dtype=torch.bfloat16)
        return torch.cat([low(chunk).float() for chunk in images.split(120)])
    run = deploy.compile_runtime(_copy(model), runtime, precision, int8, calibration, keep_float=keep)
    return torch.cat([torch.from_numpy(run(chunk.numpy())) for chunk in images.split(120)])


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def measure(name: str, steps: int, img_size: int, calibration_images: int) -> dict:
    torch.manual_seed(0)
    model = t2t_vit.create_model(name, img_size=img_size, stem="small", num_classes=10)
    train_x, train_y, test_x, test_y = digits_data(img_size)
    train_briefly(model, train_x, train_y, steps, batch=32, lr=1e-3)  # as t2t_vit.agreement.digits_agreement
    with torch.inference_mode():
        reference = model(test_x)
    calibration = [chunk.numpy() for chunk in train_x[:calibration_images].split(10)]
    rows = []
    for runtime, precision, int8, keep in CASES:
        start = time.perf_counter()
        got = logits_of(model, test_x, runtime, precision, int8, keep, calibration)
        rows.append(dict(case=case_name(runtime, precision, int8, keep), runtime=runtime, precision=precision,
                         int8=int8, keep_float=list(keep), images=len(test_x),
                         agreement=(got.argmax(1) == reference.argmax(1)).float().mean().item(),
                         accuracy=(got.argmax(1) == test_y).float().mean().item(),
                         max_logit_diff=(got - reference).abs().max().item(), seconds=time.perf_counter() - start))
        print(f"  {rows[-1]['case']}: {100 * rows[-1]['agreement']:.1f}% ({rows[-1]['seconds']:.0f} s)", flush=True)
    margin = reference.topk(2, dim=1).values
    return dict(model=name, steps=steps, img_size=img_size, calibration_images=calibration_images,
                accuracy_fp32=(reference.argmax(1) == test_y).float().mean().item(),
                median_margin=(margin[:, 0] - margin[:, 1]).median().item(), rows=rows)


def table(result: dict) -> str:
    lines = [f"{result['model']} trained {result['steps']} steps on digits at {result['img_size']} px; "
             f"{result['rows'][0]['images']} held-out digits; fp32 accuracy {100 * result['accuracy_fp32']:.1f}%, "
             f"median top-2 margin {result['median_margin']:.2f}; int8 calibrated on {result['calibration_images']} "
             "training digits", "",
             "| runtime, precision | top-1 agreement with fp32 | accuracy | max abs logit diff |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {100 * r['agreement']:.1f}% ({round(r['agreement'] * r['images'])}/{r['images']}) "
                     f"| {100 * r['accuracy']:.1f}% | {r['max_logit_diff']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t2t_vit_7")  # t2t_vit_14 trains ~8× slower on a loaded 2-core CPU
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--json", default="benchmarks/results-deploy-agreement.json")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result = measure(args.model, args.steps, args.img_size, args.calibration_images)
    result["meta"] = dict(started=started, finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          torch=torch.__version__, threads=torch.get_num_threads(), processor=platform.processor())
    print(table(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

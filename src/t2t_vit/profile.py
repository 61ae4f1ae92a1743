"""Model size and compute: params, and MACs counted by torch's FlopCounterMode.

MACs are counted on the ``meta`` device: there every op has a registered FLOP formula and nothing
is computed. "MACs without attention" leaves out the attention cores — q·kᵀ and attn·v, or the
Performer's feature maps and products — the convention some third-party tables use. The cores are
parameter-free submodules (:class:`~t2t_vit.layers.AttentionCore`,
:class:`~t2t_vit.t2t_layers.PerformerCore`), so FlopCounterMode's per-module counts give them directly.
"""
from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from t2t_vit.layers import AttentionCore
from t2t_vit.t2t_layers import PerformerCore

ATTENTION_CORES = (AttentionCore, PerformerCore)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts.

    The total includes the fixed tables kept as buffers (``pos_embed``, the Performer's ``w``),
    as the paper's and the reference code's counts do; trainable counts what the optimizer updates.
    """
    total = sum(p.numel() for p in model.parameters())
    total += sum(t.numel() for name, t in model.state_dict().items() if _is_fixed_table(name))
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def _is_fixed_table(key: str) -> bool:
    return key == "pos_embed" or key.endswith(".w")


def count_macs(model: nn.Module, input_size: tuple[int, int, int], batch: int = 1) -> tuple[float, float]:
    """(MACs, MACs without the attention cores) of one forward pass, per image.

    Works on a copy of ``model`` on the meta device: the model itself is left as it is.
    """
    meta_model = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta_model(torch.empty(batch, *input_size, device="meta"))
    per_module = counter.get_flop_counts()
    root = type(meta_model).__name__
    cores = {f"{root}.{name}" for name, m in meta_model.named_modules() if isinstance(m, ATTENTION_CORES)}
    attention = sum(sum(per_module.get(name, {}).values()) for name in cores)
    total = counter.get_total_flops()
    return total / 2 / batch, (total - attention) / 2 / batch


def profile_model(name: str, img_size: int | tuple[int, int] = 224, **kwargs: Any) -> dict[str, Any]:
    """Params and MACs of a registered model, beside the figures the paper and reference report."""
    from t2t_vit import create_model
    from t2t_vit.variants import VARIANTS

    model = create_model(name, img_size=img_size, **kwargs)
    total, trainable = count_params(model)
    h, w = model.img_size
    macs, macs_no_attn = count_macs(model, (3, h, w))
    variant = VARIANTS[name]
    row: dict[str, Any] = dict(
        model=name, img_size=[h, w] if h != w else h, params_m=round(total / 1e6, 3),
        trainable_params_m=round(trainable / 1e6, 3), gmacs=round(macs / 1e9, 3),
        gmacs_no_attn=round(macs_no_attn / 1e9, 3), tokens=model.grid_size[0] * model.grid_size[1],
    )
    if (h, w) == (224, 224) and not kwargs:
        row.update(paper_params_m=variant.paper.params_m, paper_gmacs=variant.paper.gmacs,
                   paper_top1=variant.paper.top1)
        if variant.reference:
            row.update(reference_params_m=variant.reference.params_m, reference_gmacs=variant.reference.gmacs)
    return row


def _fmt(value: Any) -> str:
    return "–" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    headers = ["model", "img", "params M", "trainable M", "GMACs", "GMACs w/o attn", "paper params M",
               "paper GMACs", "paper top-1"]
    keys = ["model", "img_size", "params_m", "trainable_params_m", "gmacs", "gmacs_no_attn", "paper_params_m",
            "paper_gmacs", "paper_top1"]
    lines = [[_fmt(r.get(k)) for k in keys] for r in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*headers)] + [fmt.format(*line) for line in lines])


def run(args: argparse.Namespace) -> int:
    from t2t_vit import list_models
    from t2t_vit.errors import T2TViTError, check_range
    from t2t_vit.metadata import MAX_IMG

    check_range("--img-size", args.img_size, 1, MAX_IMG)  # --img-size 100000 would allocate ~80 GB for the position table
    names = list_models() if args.all or not args.names else args.names
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise T2TViTError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")
    extra = {"stem": args.stem} if args.stem else {}
    rows = [profile_model(n, img_size=args.img_size, **extra) for n in names]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, markdown=args.markdown))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile", help="params and MACs of models, beside the paper's figures",
        description="Count params and MACs (torch FlopCounterMode on the meta device), with and "
                    "without the attention matmuls, beside the figures the paper reports.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="models to profile (default: all)")
    parser.add_argument("--all", action="store_true", help="profile every registered model")
    parser.add_argument("--img-size", type=int, default=224, help="input side length (default 224)")
    parser.add_argument("--stem", choices=["imagenet", "small"], help="soft-split schedule (default: imagenet)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.set_defaults(func=run)

"""Model size and compute: params, and MACs counted by torch's FlopCounterMode.

MACs are counted on the ``meta`` device: there every op, the fused attention kernel included,
has a registered FLOP formula (on CPU the fused kernel counts as zero) and nothing is computed.
"MACs without attention" repeats the count with the attention core — q·kᵀ and attn·v, or the
Performer's feature maps and products — left out, the convention some third-party tables use.
"""
from __future__ import annotations

import argparse
import copy
import json
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

from t2t_vit.layers import Attention
from t2t_vit.t2t import TokenPerformer


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; frozen tensors such as pos_embed count in the total."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def _attention_uncounted() -> Iterator[None]:
    """Run every attention core outside the active FlopCounterMode."""
    originals = {cls: cls.attend for cls in (Attention, TokenPerformer)}

    def hide(fn):
        def attend(self, *args, **kwargs):
            with _disable_current_modes():
                return fn(self, *args, **kwargs)

        return attend

    try:
        for cls, fn in originals.items():
            cls.attend = hide(fn)
        yield
    finally:
        for cls, fn in originals.items():
            cls.attend = fn


def count_macs(model: nn.Module, input_size: tuple[int, int, int], batch: int = 1) -> tuple[float, float]:
    """(MACs, MACs without attention matmuls) of one forward pass, per image.

    Works on a copy of ``model`` on the meta device: the model itself is left as it is.
    """
    meta_model = copy.deepcopy(model).to("meta").eval()
    x = torch.empty(batch, *input_size, device="meta")
    counts = []
    for hide_attention in (False, True):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            if hide_attention:
                with _attention_uncounted():
                    meta_model(x)
            else:
                meta_model(x)
        counts.append(counter.get_total_flops() / 2 / batch)
    return counts[0], counts[1]


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
    from t2t_vit.errors import T2TViTError

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

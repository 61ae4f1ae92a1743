"""`t2t-vit predict IMAGE...`: top-k classes per image (parses, calls t2t_vit.inference, prints).

The model, its preprocessing and its class names come from :func:`t2t_vit.inference.load`;
images are read one batch at a time, and an unreadable one is named once on stderr while the
others are still predicted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from t2t_vit.cli_args import add_model_args, add_runtime_args, load_inference
from t2t_vit.errors import T2TViTError, check_range


def shown(text: str) -> str:
    """``text`` as printed on a terminal: control characters (ANSI escapes, newlines) escaped, so a
    class name stored in a checkpoint cannot fake or erase output lines."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def _print_top(path: str, top: list[tuple[int, str, float]]) -> None:
    print(shown(path))
    for rank, (index, name, prob) in enumerate(top, 1):
        print(f"  {rank}. {100 * prob:6.2f}%  {shown(name)} ({index})")


def _record(path: str, top: list[tuple[int, str, float]]) -> dict[str, Any]:
    return {"image": path, "predictions": [{"index": i, "label": n, "probability": p} for i, n, p in top]}


def image_files(paths: list[str]) -> list[str]:
    """The images to classify: a file as given, a folder as the image files under it (sorted, the
    extensions training reads, hidden entries and linked folders skipped)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from t2t_vit.data.folder import images_under

    files: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = images_under(path)
        if not found:
            raise T2TViTError(f"no image files in {path} (looked for {', '.join(IMG_EXTENSIONS)})")
        files += found
    return files


def run(args: argparse.Namespace) -> int:
    check_range("--topk", args.topk, 1)
    check_range("--batch-size", args.batch_size, 1)
    args.images = image_files(args.images)
    clf = load_inference(args)
    if args.checkpoint is None and not args.pretrained:
        print(f"t2t-vit: note: {clf.description}: no --checkpoint or --pretrained, predictions are meaningless",
              file=sys.stderr)
    records, failures = [], []
    for path, top, error in clf.classify_files(args.images, args.topk, args.batch_size):
        if error is not None:
            failures.append({"image": path, "error": str(error)})
            print(f"t2t-vit: {shown(error)}", file=sys.stderr)
        elif args.json:
            records.append(_record(path, top))
        else:
            _print_top(path, top)
    if args.json:
        print(json.dumps(records + failures, indent=2))
    if len(failures) == len(args.images):
        raise T2TViTError("none of the images could be read")
    return 1 if failures else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify images: top-k class names and probabilities")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything PIL reads) or folders of them")
    add_model_args(p)
    add_runtime_args(p, runtimes=True)
    p.add_argument("--topk", type=int, default=5, help="how many classes to list per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)

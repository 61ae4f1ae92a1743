"""Benchmark T2T-ViT against what users would run instead: prints a table, writes JSON.

    python benchmarks/run.py --quick          # a short look: T2T-ViT-14 beside DeiT-S, batch 8
    python benchmarks/run.py                  # the full suite (same as `t2t-vit bench`)

See docs/benchmarks.md for what is measured and the numbers we got.
"""
from __future__ import annotations

import argparse
import sys

from t2t_vit.bench import add_arguments, run
from t2t_vit.errors import T2TViTError
from t2t_vit.runtime import tune_for_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    tune_for_command()  # as `t2t-vit bench` does
    try:
        sys.exit(run(parser.parse_args()))
    except T2TViTError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        sys.exit(2)

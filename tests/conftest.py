import os

import pytest
import torch
from PIL import Image

from t2t_vit.cli import main

from helpers import ARCH, MEAN, STD, eval_top1

# Two cores: one intra-op thread per test process keeps runs predictable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("T2T_TEST_THREADS", "1")))

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- one tiny `t2t-vit train` run on the digits as a PNG folder, shared by the tests of timm's clients
# (tests/test_timm_scripts.py, tests/test_hf_folders.py)
@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """The digits as 40 px PNGs in train/ and val/ class folders: resizing and cropping to 32 px matter."""
    from t2t_vit.data.arrays import load_digits_arrays

    root = tmp_path_factory.mktemp("digits_png")
    tx, ty, vx, vy, _, _ = load_digits_arrays(40)
    for split, images, labels in (("train", tx, ty), ("val", vx, vy)):
        for index, (pixels, label) in enumerate(zip(images, labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return root


@pytest.fixture(scope="session")
def trained(digits_folder, tmp_path_factory):
    """(run folder, `t2t-vit eval` top-1 of checkpoint-best) of a tiny run with EMA on (the default)."""
    out = tmp_path_factory.mktemp("run") / "run"
    flags = ["--data", str(digits_folder), "--model", "t2t_vit_7", "--model-kwargs", str(ARCH).replace("'", ""),
             "--img-size", "32", "--stem", "small", "--crop-pct", "1.0", "--mean", str(list(MEAN)),
             "--std", str(list(STD)), "--no-augment", "--epochs", "3", "--batch-size", "48", "--workers", "0",
             "--lr", "3e-3", "--ema-decay", "0.9", "--output", str(out)]
    assert main(["train", *flags]) == 0
    return out, eval_top1(out / "checkpoint-best.safetensors", digits_folder)

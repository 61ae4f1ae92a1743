"""Helpers shared by several test files: one module, so that no test file imports another.

Fixtures live in conftest.py; plain functions and constants live here (``from helpers import ...``;
pytest puts tests/ on the import path).
"""
from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import t2t_vit
from t2t_vit.cli import main
from t2t_vit.storage import save_weights


# ---- hostile and honest checkpoints (tests/test_safety_loading.py, tests/test_safety_downloads.py) ----
SMALL = dict(img_size=32, stem="small", num_classes=10)

GARBAGE = [b"error code: 1020", b"Moved", b"hello", b"rr", b"", b"\x80\x02garbage", b"<html>\n<h1>404</h1>"]


def small(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return t2t_vit.create_model("t2t_vit_7", **SMALL).eval()


def authors_file(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict_ema": {"module." + k: v for k, v in model.state_dict().items()}}, buffer)
    return buffer.getvalue()


def poisoned(tmp_path: Path, model: str, honest: dict | None = None, **kwargs) -> Path:
    """One of our checkpoints whose metadata asks for ``kwargs`` on top of an honest small model."""
    honest = {"img_size": 32, "stem": "small"} if honest is None else honest
    meta = dict(format="t2t-vit", model=model, model_kwargs={**honest, **kwargs},
                num_classes=10)
    return save_weights(small(), tmp_path / "poison.safetensors", metadata=meta)


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(path)
    return path


# ---- every registered model (tests/test_models.py, tests/test_timm_contract.py) ----------------
REGISTERED = [
    "t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24", "t2t_vit_t_14",
    "t2t_vit_t_19", "t2t_vit_t_24", "t2t_vit_14_resnext", "t2t_vit_14_wide", "t2t_vit_14_se",
    "t2t_vit_16_ghost", "t2t_vit_dense", "t2t_vit_14_wo_t2t", "t2t_vit_c_14", "vit_s16", "vit_s16_dn",
    "vit_s16_sw", "vit_s16_dense", "vit_s16_se", "vit_s16_resnext", "vit_s16_ghost",
]


def small_variant(name: str, **overrides) -> t2t_vit.T2TViT:
    """A registered model at 64 px with few blocks (dense variants keep their stages)."""
    args = dict(img_size=64, num_classes=7, **({} if "dense" in name else dict(depth=2)))
    torch.manual_seed(0)
    return t2t_vit.create_model(name, **{**args, **overrides})


# ---- a tiny T2T-ViT (tests/test_fastpaths.py, tests/test_precision.py) ----------------------
TINY = dict(img_size=16, stem="small", num_classes=10, embed_dim=32, depth=2, num_heads=2, token_dim=16)


def tiny(name: str = "t2t_vit_7", **overrides) -> t2t_vit.T2TViT:
    torch.manual_seed(0)
    return t2t_vit.create_model(name, **{**TINY, **overrides})


# ---- images (tests/test_data_folder.py, tests/test_data.py) ------------------------------------
def rgb(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# ---- training runs in subprocesses (tests/test_train_e2e.py, tests/test_preempt.py) ----------
SRC = str(Path(__file__).resolve().parents[1] / "src")
TRAIN_FLAGS = ["--model", "t2t_vit_7", "--model-kwargs", "{embed_dim: 64, depth: 2, num_heads: 2, token_dim: 16}",
               "--img-size", "32", "--stem", "small", "--workers", "0", "--threads", "1", "--log-every", "1000"]


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "t2t_vit", "train", *TRAIN_FLAGS, *args]


def run_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint-last.safetensors"))


def assert_same(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= tol, worst


# ---- the tiny digits run (fixtures digits_folder and trained in conftest.py) -------------------
ARCH = dict(embed_dim=64, depth=2, num_heads=2, token_dim=16)
MEAN, STD = (0.25, 0.25, 0.25), (0.35, 0.35, 0.35)  # neither ImageNet's nor timm's defaults


def eval_top1(checkpoint, data) -> float:
    import contextlib

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--workers", "0",
                     "--device", "cpu"]) == 0
    return float(re.search(r"top-1 ([\d.]+)%", text.getvalue()).group(1))


# ---- `t2t-vit train` configs (tests/test_train_cli.py, tests/test_train_config.py) -----------------------
# A one-step training of a tiny T2T-ViT-7 at 32 px.
BASE = dict(model="t2t_vit_7", model_kwargs=dict(embed_dim=64, depth=2, num_heads=2, token_dim=16), img_size=32,
            stem="small", workers=0, threads=1, log_every=1000, epochs=1, max_steps=1, batch_size=8)


def captured_config(argv: list[str], monkeypatch) -> t2t_vit.train.TrainConfig:
    """The config `t2t-vit train ARGV` would train, without training."""
    import t2t_vit.train.engine as engine

    seen = {}
    monkeypatch.setattr(engine, "train", lambda cfg: seen.setdefault("cfg", cfg))
    assert main(["train", *argv]) == 0
    return seen["cfg"]

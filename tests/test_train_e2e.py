"""End-to-end training runs in subprocesses: SIGKILL + resume, torchrun DDP, fine-tuning, distillation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from t2t_vit.train import TrainConfig, train
from t2t_vit.reading import read_metadata

from helpers import TRAIN_FLAGS, assert_same, run_weights, subprocess_env, train_command


@pytest.mark.e2e
def test_sigkill_and_resume_auto_gives_the_same_weights(tmp_path):
    # Augmentation, drop path and EMA on: every random stream must be restored exactly.
    args = ["--deterministic", "--epochs", "2", "--batch-size", "64", "--save-every-steps", "4",
            "--drop-path", "0.1", "--ema-decay", "0.99"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(train_command(*args, "--output", str(whole)), env=subprocess_env(), check=True, capture_output=True,
                   timeout=600)

    proc = subprocess.Popen(train_command(*args, "--output", str(killed)), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint-last.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if int(read_metadata(str(ckpt))["step"]) >= 8:
                break
        except Exception:  # not written yet
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(read_metadata(str(ckpt))["step"])
    assert killed_at < 44  # 2 epochs × 22 steps: it really was interrupted

    done = subprocess.run(train_command(*args, "--output", str(killed), "--resume", "auto"), env=subprocess_env(),
                          capture_output=True, text=True, check=True, timeout=600)  # a resume that never ends fails, not hangs
    assert f"resumed from {killed / 'checkpoint-last'} at step {killed_at}" in done.stdout
    assert_same(run_weights(whole), run_weights(killed), 1e-6)  # model and EMA
    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (whole, killed))
    assert m1["steps"] == m2["steps"] == 44 and m1["val_top1"] == m2["val_top1"]


@pytest.mark.e2e
def test_ddp_two_processes_match_one_process(tmp_path):
    # SGD: Adam's m/sqrt(v) turns float-rounding noise in near-zero gradients into full lr-sized
    # steps, so it cannot show 1e-5 agreement even between two single-process runs on other hardware.
    common = ["--no-augment", "--drop-path", "0", "--epochs", "1", "--max-steps", "6", "--opt", "sgd",
              "--lr", "0.05", "--warmup-epochs", "0"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "t2t_vit", "train", *TRAIN_FLAGS, *common, "--batch-size", "16", "--output", str(ddp)]
    # The T2T transformer layer: the Performer layer has the authors' fixed dropout 0.1, whose masks
    # cannot agree between one and two processes.
    single_cmd = train_command(*common, "--batch-size", "32", "--output", str(single))
    for cmd in (single_cmd, launcher):
        cmd[cmd.index("--model-kwargs") + 1] = "{embed_dim: 64, depth: 2, num_heads: 2, token_dim: 16, tokenizer: transformer}"
    subprocess.run(single_cmd, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    result = subprocess.run(launcher, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same(run_weights(single), run_weights(ddp), 1e-5)
    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (single, ddp))
    assert m2["world_size"] == 2 and m1["steps"] == m2["steps"] == 6
    assert m1["val_top1"] == pytest.approx(m2["val_top1"])  # the val set is sharded, then reduced
    train_loss = [float((run / "history.csv").read_text().splitlines()[1].split(",")[3]) for run in (single, ddp)]
    assert train_loss[0] == pytest.approx(train_loss[1], rel=1e-5)  # reduced over ranks too
    assert sorted(os.listdir(ddp)) == sorted(os.listdir(single))  # only rank 0 wrote


@pytest.mark.e2e
def test_finetune_new_head_and_distillation(tmp_path):
    base = dict(model="t2t_vit_7", model_kwargs=dict(embed_dim=64, depth=2, num_heads=2, token_dim=16),
                img_size=32, stem="small", workers=0, threads=1, log_every=1000, epochs=1, max_steps=3, batch_size=16)
    train(TrainConfig(**base, output=str(tmp_path / "teacher")))
    teacher = str(tmp_path / "teacher" / "checkpoint-last.safetensors")
    # Fine-tune to 12 classes: the body is loaded, the 10-class head is replaced.
    tuned = train(TrainConfig(**base, finetune=teacher, num_classes=12, opt="sgd", lr=0.05, body_lr_scale=0.01,
                              output=str(tmp_path / "tuned")))
    w_teacher, w_tuned = load_file(teacher), run_weights(tmp_path / "tuned")
    assert w_tuned["head.weight"].shape == (12, 64)
    moved = (w_tuned["blocks.0.mlp.fc1.weight"] - w_teacher["blocks.0.mlp.fc1.weight"]).abs().max()
    assert 0 < moved < 1e-2  # started from the teacher's body, updated with the small body lr
    for kind in ("soft", "hard"):
        m = train(TrainConfig(**base, teacher=teacher, distill=kind, distill_alpha=0.5, distill_tau=2.0,
                              output=str(tmp_path / kind)))
        assert m["steps"] == 3 and m["val_loss"] == m["val_loss"]
    assert tuned["steps"] == 3


def test_timm_model_checkpoint_rebuilds_with_its_own_img_size(tmp_path):
    from t2t_vit.checkpoint import model_from_checkpoint

    cfg = TrainConfig(data="digits", model="vit_tiny_patch16_224", img_size=32, workers=0, threads=1,
                      log_every=1000, epochs=1, max_steps=1, batch_size=8, output=str(tmp_path / "vit"),
                      model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    train(cfg)
    model = model_from_checkpoint(str(tmp_path / "vit" / "checkpoint-last.safetensors"))
    assert model.patch_embed.img_size == (32, 32) and model.num_classes == 10

"""SIGKILL at arbitrary moments of checkpoint writing never leaves an unusable checkpoint."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from t2t_vit.train import state

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Saves checkpoints as fast as it can; the weights of save i are all equal to i, so a reader can
# tell whether weights and training state come from the same save.
WRITER = textwrap.dedent("""
    import sys, torch
    from t2t_vit.train.state import save_checkpoint
    model, ema = torch.nn.Linear(512, 512), torch.nn.Linear(512, 512)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in list(model.parameters()) + list(ema.parameters()):
                p.fill_(step)
        save_checkpoint(sys.argv[1], model, ema, dict(model="linear", step=str(step)),
                        dict(step=step, optimizer={"state": {}}, blob=torch.full((64, 1024), float(step))))
        if step == 1:
            print("saving", flush=True)
""")


@pytest.mark.e2e
def test_sigkill_during_checkpoint_writes(tmp_path):
    rng = random.Random(0)
    stem = str(tmp_path / "checkpoint-last")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    steps = []
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, stem], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(rng.uniform(0.05, 0.6))  # somewhere inside a later save
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        weights, ema, st = state.load_resume(stem)  # must never raise
        step = st["step"]
        assert all(torch.all(t == step) for t in list(weights.values()) + list(ema.values()))
        assert torch.all(st["blob"] == step)
        steps.append(step)
    assert max(steps) > 1  # the kills landed after several saves, not only before the first


TINY = dict(model="t2t_vit_7", model_kwargs=dict(embed_dim=64, depth=2, num_heads=2, token_dim=16), img_size=32,
            stem="small", workers=0, threads=1, log_every=1000, epochs=1, batch_size=8)


def test_without_tensorboard_history_and_curves_are_still_written(tmp_path, monkeypatch, capsys):
    from t2t_vit.train import TrainConfig, train

    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorboard` now raises ImportError
    out = tmp_path / "run"
    train(TrainConfig(**TINY, max_steps=1, output=str(out)))
    assert "no TensorBoard events" in capsys.readouterr().out
    assert not (out / "tensorboard").exists()
    assert (out / "history.csv").read_text().count("\n") == 2  # header + one evaluation
    assert (out / "curves.png").stat().st_size > 0


CLI_TINY = ["--model", "t2t_vit_7", "--model-kwargs", "{embed_dim: 64, depth: 2, num_heads: 2, token_dim: 16}",
            "--img-size", "32", "--stem", "small", "--threads", "1", "--log-every", "1000", "--batch-size", "16"]


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "t2t_vit", "train", *CLI_TINY, *args]


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def kill_when(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists."""
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.e2e
def test_killed_during_the_final_evaluation_resumes_to_the_end(tmp_path):
    out = tmp_path / "run"
    # two forked loader workers: the resume right after the SIGKILL must not find the lock held (item 13)
    args = ["--workers", "2", "--max-steps", "4", "--save-every-steps", "4", "--output", str(out)]
    proc = subprocess.Popen(train_cmd(*args), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, out / "checkpoint-last.safetensors")  # step 4 saved, its evaluation under way
    assert not (out / "metrics.json").exists()
    done = subprocess.run(train_cmd(*args, "--resume", "auto"), env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the evaluation after step 4 did not complete" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["val_top1"] is not None and metrics["best_val_top1"] >= 0
    assert (out / "checkpoint-best.safetensors").is_file()


# Locks the run directory, then forks a child that outlives it, as DataLoader workers do.
LOCK_HOLDER = textwrap.dedent("""
    import multiprocessing, sys, time
    from t2t_vit.train.rundir import lock_output
    with lock_output(sys.argv[1]):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        print(child.pid, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("attempt", range(3))
def test_a_sigkilled_trainers_lock_is_free_at_once(tmp_path, attempt):
    from t2t_vit.train.rundir import lock_output

    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, out], env=child_env(), stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with lock_output(out):  # the forked child still runs, but must not hold the lock
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_output_directory_deleted_mid_run_stops_with_one_line(tmp_path, monkeypatch):
    """Issue 23 item 14: the directory was re-created without .lock/config.yaml and the run died in
    TensorBoard with a traceback."""
    import shutil

    from t2t_vit.errors import T2TViTError
    from t2t_vit.train import TrainConfig, report, train

    out = tmp_path / "run"
    real_step = report.Progress.step

    def step(self, step, *args):
        if step == 2:
            shutil.rmtree(out)  # someone cleans up runs/ while this one trains
        return real_step(self, step, *args)

    monkeypatch.setattr(report.Progress, "step", step)
    with pytest.raises(T2TViTError, match="was deleted or replaced during the run") as info:
        train(TrainConfig(**TINY, max_steps=4, save_every_steps=3, output=str(out)))
    assert len(str(info.value).splitlines()) == 1
    assert not out.exists()  # not silently re-created

"""SIGKILL at arbitrary moments of checkpoint writing never leaves an unusable checkpoint."""
from __future__ import annotations

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

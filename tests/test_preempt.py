"""Preemption: a real signal mid-epoch stops every rank after the same step with checkpoint-last saved
and exit code 128 + signal; ``--resume auto`` then ends with the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from t2t_vit.reading import read_metadata
from t2t_vit.errors import T2TViTError
from t2t_vit.train.preempt import parse_signals
from helpers import TRAIN_FLAGS, assert_same, run_weights, subprocess_env, train_command

# Augmentation, drop path and EMA on: every random stream must be restored exactly. --log-every 1
# prints "step N" lines, which tell the test when the run is mid-epoch.
SINGLE = ["--deterministic", "--epochs", "1", "--max-steps", "10", "--batch-size", "64", "--drop-path", "0.1",
          "--ema-decay", "0.99", "--log-every", "1"]


def signal_at_step(cmd: list[str], step: int, sig: int) -> subprocess.CompletedProcess:
    """Run ``cmd``, send ``sig`` to it once it printed ``step {step}``; the finished process."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = False
    for line in proc.stdout:
        if line.startswith(f"step {step} "):
            proc.send_signal(sig)
            sent = True
            break
    out, err = proc.communicate(timeout=600)
    assert sent, f"the run ended before step {step}: {err[-1500:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stopped_step(run) -> int:
    return int(read_metadata(str(run / "checkpoint-last.safetensors"))["step"])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole")
    subprocess.run(train_command(*SINGLE, "--output", str(run)), env=subprocess_env(), check=True, capture_output=True,
                   timeout=600)
    return run


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_signal_mid_epoch_saves_and_resume_is_exact(sig, whole, tmp_path):
    run = tmp_path / "run"
    stopped = signal_at_step(train_command(*SINGLE, "--output", str(run)), 3, sig)
    assert stopped.returncode == 128 + sig, stopped.stderr[-1500:]
    step = stopped_step(run)
    assert 3 <= step < 10  # it stopped mid-epoch, after the step it was in
    assert f"stopped by {signal.Signals(sig).name} after step {step}" in stopped.stderr
    assert f"resume with: t2t-vit train --config {run / 'config.yaml'} --output {run} --resume auto" in stopped.stderr

    done = subprocess.run(train_command(*SINGLE, "--output", str(run), "--resume", "auto"), env=subprocess_env(),
                          capture_output=True, text=True, check=True, timeout=600)
    assert f"resumed from {run / 'checkpoint-last'} at step {step}" in done.stdout
    assert_same(run_weights(whole), run_weights(run), 0.0)  # model and EMA, bit for bit
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (whole, run))
    assert m1["steps"] == m2["steps"] == 10 and m1["val_top1"] == m2["val_top1"]


@pytest.mark.e2e
def test_sigterm_to_torchrun_stops_both_ranks_and_resume_is_exact(tmp_path):
    # 1437 digits / (24 × 2 ranks) = 29 micro-batches: 14 steps of 2 and one left over, which
    # no rank may step on (a partial accumulation window used to loop forever).
    args = [*TRAIN_FLAGS, "--deterministic", "--epochs", "1", "--batch-size", "24", "--accum-steps", "2",
            "--drop-path", "0.1", "--ema-decay", "0.99", "--log-every", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "t2t_vit", "train", *args]
    whole, run = tmp_path / "whole", tmp_path / "run"
    result = subprocess.run([*launcher, "--output", str(whole)], env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    stopped = signal_at_step([*launcher, "--output", str(run)], 3, signal.SIGTERM)  # to the launcher
    assert stopped.returncode != 0
    assert stopped.stderr.count("training stopped by SIGTERM") == 2, stopped.stderr[-2000:]  # each rank
    step = stopped_step(run)
    assert 3 <= step < 14 and stopped.stderr.count(f"after step {step};") == 2  # the same step on both ranks

    done = subprocess.run([*launcher, "--output", str(run), "--resume", "auto"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {run / 'checkpoint-last'} at step {step}" in done.stdout
    assert_same(run_weights(whole), run_weights(run), 0.0)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (whole, run))
    assert m1["steps"] == m2["steps"] == 14 and m1["epochs"] == m2["epochs"] == 1


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (read from /proc: its parent and RANK)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher_pid}")


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker through /proc")
def test_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    args = [*TRAIN_FLAGS, "--epochs", "1", "--max-steps", "20", "--batch-size", "16", "--log-every", "1",
            "--output", str(tmp_path / "run")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "t2t_vit", "train", *args]
    proc = subprocess.Popen(launcher, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # rank 0 prints the steps; rank 1 alone gets the signal
        if line.startswith("step 3 "):
            os.kill(rank_pid(proc.pid, 1), signal.SIGUSR1)
            break
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    step = stopped_step(tmp_path / "run")
    assert 3 <= step < 20 and err.count(f"training stopped by SIGUSR1 after step {step};") == 2, err[-2000:]


def test_accumulation_with_a_partial_window_finishes_every_epoch(tmp_path):
    # 1437 / 128 = 11 micro-batches, 2 steps of 4 and 3 left over per epoch: the epoch must end.
    tiny = [arg if arg != "{embed_dim: 64, depth: 2, num_heads: 2, token_dim: 16}" else
            "{embed_dim: 16, depth: 1, num_heads: 1, token_dim: 8}" for arg in TRAIN_FLAGS]
    cmd = [sys.executable, "-m", "t2t_vit", "train", *tiny, "--epochs", "2", "--batch-size", "128",
           "--accum-steps", "4", "--output", str(tmp_path / "run")]
    subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True, timeout=300)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["epochs"] == 2


def test_a_signal_during_the_ranks_agreement_is_not_lost(monkeypatch):
    # The handler runs at the first bytecode after a blocking collective returns, i.e. inside the
    # agreement, after the local flag was read: it must not be overwritten by the reduced value.
    from t2t_vit.train import preempt
    from t2t_vit.train.distributed import World

    def reduce_while_signalled(value, world):
        os.kill(os.getpid(), signal.SIGUSR1)
        return value

    monkeypatch.setattr(preempt, "all_reduce_max", reduce_while_signalled)
    with preempt.StopRequest([signal.SIGUSR1], announce=False) as stop:
        assert not stop.agreed(World(rank=0, size=2))  # this step's flag was read before the signal
        assert stop.agreed(World(rank=0, size=2)) and stop.signum == signal.SIGUSR1  # the next step stops
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


def test_preempt_signals_are_parsed_and_checked():
    assert parse_signals("TERM,USR1") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals("sigusr2, 1") == (signal.SIGUSR2, signal.SIGHUP)
    assert parse_signals("none") == () and parse_signals(None) == ()
    for bad in ("KILL", "STOP", "FOO", "0"):
        with pytest.raises(T2TViTError, match="not a signal that can be caught"):
            parse_signals(bad)


def test_bad_preempt_signal_flag_is_one_line(tmp_path):
    result = subprocess.run(train_command("--preempt-signals", "TERM,KILL", "--output", str(tmp_path / "r")),
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "t2t-vit: error: --preempt-signals: 'KILL' is not a signal that can be caught; use names such as "
        "TERM,USR1,USR2,HUP (or 'none')"]

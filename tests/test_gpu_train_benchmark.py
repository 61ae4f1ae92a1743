"""benchmarks/gpu_train.py --dry-run: the GPU training benchmark's code path (the real trainer with the
paper's recipe, fused AdamW, the timed loader, FLOP counting) on a CPU at tiny size. No timing asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_measures_every_figure(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), "--dry-run", "--folder", str(tmp_path),
           "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["model"] == "t2t_vit_14" and r["dry_run"] and r["device"] == "cpu"
    assert r["steps"] == 6 and r["steady_steps"] >= 3  # 5 steps an epoch: epoch starts are left out
    assert r["images_per_s"] > 0 and 0 <= r["loader_share"] < 1
    assert r["fused_adamw"] is True and r["train_flops_per_image"] > 0 and r["of_matmul_rate"] > 0
    assert r["mfu"] is None and r["peak_memory_mb"] is None  # no known peak and no CUDA memory on a CPU
    assert "img/s over" in done.stdout and "loader wait" in done.stdout
    assert sorted(p.name for p in (tmp_path / "data" / "train").iterdir())[:2] == ["astronaut", "camera"]

"""`t2t-vit experiment ablation`: arm definitions, resumability and outputs through the real trainer."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from t2t_vit import experiment
from t2t_vit.experiment import PRESETS, ablation_arms, build_arm_model, run_ablation
from t2t_vit.profile import count_macs


def test_arms_share_backbone_and_token_count():
    arms = {a.name: a for a in ablation_arms(PRESETS["digits"])}
    assert list(arms) == ["t2t", "no_t2t", "t2t_conv", "shallow_wide", "vit", "resnet"]
    tokens = {}
    for name in ("t2t", "no_t2t", "t2t_conv", "shallow_wide"):
        model = build_arm_model(arms[name], num_classes=10)
        tokens[name] = model.grid_size
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert set(tokens.values()) == {(8, 8)}  # every transformer arm sees 64 tokens
    # same backbone: the patch and conv arms differ from the T2T arm only in the tokenizer
    for name in ("no_t2t", "t2t_conv"):
        diff = {k for k in arms["t2t"].model_kwargs if arms["t2t"].model_kwargs[k] != arms[name].model_kwargs.get(k)}
        assert diff == {"tokenizer"}
    sizes = {n: sum(p.numel() for p in build_arm_model(a, 10).parameters()) for n, a in arms.items()}
    assert max(sizes.values()) / min(sizes.values()) < 1.6, sizes  # "similar size"


def test_count_macs_matches_hand_count():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 32 * 32, 10, bias=False))
    macs, _ = count_macs(model, (3, 32, 32))
    assert macs == 32 * 32 * 8 * 3 * 9 + 8 * 32 * 32 * 10
    assert model[0].weight.device.type == "cpu"  # counting works on a copy


@pytest.mark.e2e
def test_ablation_runs_resumes_and_writes_outputs(tmp_path):
    from t2t_vit.train import train

    calls = []

    def counting_train(cfg):
        calls.append((cfg.model, cfg.seed, cfg.resume))
        cfg.threads = 1
        return train(cfg)

    kwargs = dict(seeds=2, epochs=1, batch_size=16, max_steps=2, arms=["t2t", "no_t2t", "resnet"], log=lambda s: None)
    summary = run_ablation("digits", tmp_path, train_fn=counting_train, **kwargs)
    assert len(calls) == 6 and all(r == "auto" for _, _, r in calls)
    for name in ("md", "json", "png"):
        assert (tmp_path / f"ablation.{name}").stat().st_size > 100
    saved = json.loads((tmp_path / "ablation.json").read_text())
    rows = {a["name"]: a for a in saved["arms"]}
    assert set(rows) == {"t2t", "no_t2t", "resnet"}
    assert rows["t2t"]["params"] > rows["no_t2t"]["params"]  # the T2T module has weights; the patch split fewer
    assert rows["t2t"]["macs"] > rows["no_t2t"]["macs"] > 0
    for row in rows.values():
        assert len(row["top1"]) == 2 and row["top1_std"] >= 0
        assert row["top1_mean"] == pytest.approx(sum(row["top1"]) / 2)
    md = (tmp_path / "ablation.md").read_text()
    assert "T2T module vs plain patch split" in md and md.count("| ") >= 4 * 7
    # Second invocation: nothing re-runs, the same numbers come back.
    again = run_ablation("digits", tmp_path, train_fn=counting_train, **kwargs)
    assert len(calls) == 6
    assert [a["top1"] for a in again["arms"]] == [a["top1"] for a in summary["arms"]]
    # An unfinished run (no metrics.json) is trained again with resume="auto".
    (tmp_path / "runs" / "resnet" / "seed1" / "metrics.json").unlink()
    run_ablation("digits", tmp_path, train_fn=counting_train, **kwargs)
    assert calls[6:] == [("resnet10t", 1, "auto")]


def test_cli_parses_and_rejects_unknown_arm(tmp_path):
    parser = argparse.ArgumentParser()
    experiment.register(parser.add_subparsers())
    args = parser.parse_args(["experiment", "ablation", "--data", "digits", "--output", str(tmp_path), "--arms", "nope"])
    assert args.seeds == 3 and args.func is experiment._cmd_ablation
    with pytest.raises(experiment.T2TViTError, match="unknown arm"):
        args.func(args)

"""`t2t-vit experiment ablation`: arm definitions, resumability and outputs through the real trainer."""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from t2t_vit import experiment
from t2t_vit.experiment import PRESETS, ablation_arms, build_arm_model, run_ablation, select_arms
from t2t_vit.experiment.arms import arm_variant
from t2t_vit.experiment.report import markdown_table, summarize
from t2t_vit.profile import count_macs


def test_arms_share_backbone_and_token_count():
    arms = {a.name: a for a in ablation_arms(PRESETS["digits"])}
    assert list(arms) == ["t2t", "t2tt", "no_t2t", "t2t_conv", "shallow_wide", "vit", "resnet"]
    tokens = {}
    for name in ("t2t", "t2tt", "no_t2t", "t2t_conv", "shallow_wide"):
        model = build_arm_model(arms[name], num_classes=10)
        tokens[name] = model.grid_size
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert set(tokens.values()) == {(8, 8)}  # every transformer arm sees 64 tokens
    # same backbone: the patch and conv arms differ from the T2T arm only in the tokenizer
    for name in ("t2tt", "no_t2t", "t2t_conv"):
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

    kwargs = dict(seeds=2, epochs=1, batch_size=16, max_steps=2, arms=["t2t", "t2tt", "no_t2t", "resnet"],
                  log=lambda s: None)
    summary = run_ablation("digits", tmp_path, train_fn=counting_train, **kwargs)
    assert len(calls) == 8 and all(r == "auto" for _, _, r in calls)
    for name in ("md", "json", "png"):
        assert (tmp_path / f"ablation.{name}").stat().st_size > 100
    saved = json.loads((tmp_path / "ablation.json").read_text())
    rows = {a["name"]: a for a in saved["arms"]}
    assert set(rows) == {"t2t", "t2tt", "no_t2t", "resnet"}
    assert rows["t2t"]["params"] > rows["no_t2t"]["params"]  # the T2T module has weights; the patch split fewer
    assert rows["t2t"]["macs"] > rows["no_t2t"]["macs"] > 0
    assert rows["t2tt"]["macs"] > rows["t2t"]["macs"]  # exact attention over 1,024 tokens costs more than 16 features
    assert rows["t2tt"]["model_kwargs"]["tokenizer"] == "transformer"
    for row in rows.values():
        assert len(row["top1"]) == 2 and row["top1_std"] >= 0
        assert row["top1_mean"] == pytest.approx(sum(row["top1"]) / 2)
    md = (tmp_path / "ablation.md").read_text()
    assert "T2T module vs plain patch split" in md and "T2T-ViTt (transformer T2T) vs plain patch split" in md
    assert md.count("| ") >= 5 * 9
    # Second invocation: nothing re-runs, the same numbers come back.
    again = run_ablation("digits", tmp_path, train_fn=counting_train, **kwargs)
    assert len(calls) == 8
    assert [a["top1"] for a in again["arms"]] == [a["top1"] for a in summary["arms"]]
    # An unfinished run (no metrics.json) is trained again with resume="auto".
    (metrics,) = (tmp_path / "runs" / "resnet").glob("*/seed1/metrics.json")
    metrics.unlink()
    run_ablation("digits", tmp_path, train_fn=counting_train, **kwargs)
    assert calls[8:] == [("resnet10t", 1, "auto")]


def test_cli_parses_and_rejects_unknown_arm(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    experiment.register(parser.add_subparsers())
    command = ["experiment", "ablation", "--data", "digits", "--output", str(tmp_path)]
    args = parser.parse_args([*command, "--arms", "nope"])
    assert args.seeds == "3"
    with pytest.raises(experiment.T2TViTError, match="unknown arm"):
        args.func(args)
    seeds = []  # --seeds is a count or a list of seeds by the time the experiment runs
    monkeypatch.setattr(experiment, "run_ablation", lambda *a, **k: seeds.append(k["seeds"]))
    for text in ("3", "1,2"):
        args = parser.parse_args([*command, "--seeds", text])
        assert args.func(args) == 0
    assert seeds == [3, [1, 2]]
    with pytest.raises(experiment.T2TViTError, match="--seeds"):
        args = parser.parse_args([*command, "--seeds", "x"])
        args.func(args)


def fake_train(calls):
    """A trainer stand-in that writes what the real one does at the end: metrics.json in cfg.output."""
    def train(cfg):
        steps = cfg.max_steps or cfg.epochs * 10
        calls.append((cfg.model_kwargs.get("tokenizer"), cfg.seed, steps, cfg.epochs))
        metrics = dict(val_top1=50.0 + steps / 10 + cfg.seed, val_top5=90.0, steps=steps, train_seconds=1.0)
        (Path(cfg.output) / "metrics.json").write_text(json.dumps(metrics))
        return metrics
    return train


def no_profile(arm, num_classes):
    return {"params": 1, "macs": 1}


def test_finished_run_is_reused_only_for_the_same_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "profile_arm", no_profile)
    calls = []
    kwargs = dict(seeds=1, epochs=3, arms=["no_t2t"], train_fn=fake_train(calls), log=lambda s: None)
    first = run_ablation("digits", tmp_path, max_steps=10, **kwargs)
    assert calls == [("patch", 0, 10, 3)] and first["arms"][0]["steps"] == [10]
    assert "stopped after at most 10 optimizer steps" in (tmp_path / "ablation.md").read_text()
    # Without --max-steps the 10-step run is not "done": the full budget trains.
    full = run_ablation("digits", tmp_path, **kwargs)
    assert calls[1:] == [("patch", 0, 30, 3)] and full["arms"][0]["steps"] == [30]
    md = (tmp_path / "ablation.md").read_text()
    assert "3 epochs of batch 32" in md and "stopped after" not in md
    # Other epochs, batch size or lr: another budget again; the same budget as before: reused.
    run_ablation("digits", tmp_path, **dict(kwargs, epochs=4))
    run_ablation("digits", tmp_path, lr=5e-4, **kwargs)
    run_ablation("digits", tmp_path, batch_size=16, **kwargs)
    assert len(calls) == 5
    run_ablation("digits", tmp_path, max_steps=10, **kwargs)
    run_ablation("digits", tmp_path, lr=5e-4, **kwargs)
    assert len(calls) == 5
    # An arm option that changes the budget (t2t lr) is its own run; the report-only mode trains nothing.
    run_ablation("digits", tmp_path, **dict(kwargs, arms=["t2t", "t2t:t2t_lr=0.1"]))
    assert len(calls) == 7
    again = run_ablation("digits", tmp_path, train=False, **dict(kwargs, arms=["t2t", "t2t:t2t_lr=0.1", "t2tt"]))
    assert len(calls) == 7 and [a["name"] for a in again["arms"]] == ["t2t", "t2t-t2t_lr0.1"]


def test_budget_file_must_match(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "profile_arm", no_profile)
    kwargs = dict(seeds=1, epochs=3, arms=["no_t2t"], train_fn=fake_train([]), log=lambda s: None)
    run_ablation("digits", tmp_path, **kwargs)
    (budget,) = (tmp_path / "runs" / "no_t2t").glob("*/seed0/budget.json")
    budget.write_text(json.dumps({"epochs": 1}))
    with pytest.raises(experiment.T2TViTError, match="another budget"):
        run_ablation("digits", tmp_path, **kwargs)


def test_arm_options_parse_and_refuse():
    arms = ablation_arms(PRESETS["digits"])
    specs = ["t2t:kernel_ratio=2:t2t_drop=0", "t2tt", "t2t:t2t_lr=0.1:t2t_warmup=2", "no_t2t:epochs=20"]
    v = select_arms(arms, specs)
    names = ["t2t-kernel_ratio2-t2t_drop0", "t2tt", "t2t-t2t_lr0.1-t2t_warmup2", "no_t2t-epochs20"]
    assert [a.name for a in v] == names
    assert v[0].model_kwargs["t2t_kernel_ratio"] == 2.0 and v[0].model_kwargs["t2t_drop_rate"] == 0.0
    assert v[0].family == "t2t" and "kernel_ratio=2" in v[0].label
    assert v[2].train == {"t2t_lr_scale": 0.1, "t2t_warmup_epochs": 2.0} and v[3].train == {"epochs": 20}
    model = build_arm_model(v[0], 10)
    assert model.tokens_to_token.attention1.num_features == 64  # 2 × token width 32
    for bad, message in [("t2t:nope=1", "unknown arm option"), ("resnet:kernel_ratio=2", "needs an arm with a T2T"),
                         ("t2t:kernel_ratio=x", "needs a float"), ("t2t:epochs=0", "positive"),
                         ("t2t:lr=nan", "finite"), ("t2t:t2t_drop", "not key=value"), ("nope:epochs=2", "unknown arm")]:
        with pytest.raises(experiment.T2TViTError, match=message):
            select_arms(arms, [bad])
    with pytest.raises(experiment.T2TViTError, match="twice"):
        select_arms(arms, ["t2t", "t2t"])


def test_t2t_module_lr_multiplier_and_warmup():
    """The arm options reach the trainer's own settings: the T2T module's groups run at the
    shared lr × 0.1, ramped from 0 over 2 epochs; the other groups follow the shared schedule."""
    from t2t_vit.train import TrainConfig, recipe

    arm = arm_variant(ablation_arms(PRESETS["digits"])[0], {"t2t_lr": "0.1", "t2t_warmup": "2"})
    cfg = TrainConfig(model=arm.model, model_kwargs=dict(arm.model_kwargs), warmup_epochs=0.0, lr=1e-3,
                      **arm.train)
    model = build_arm_model(arm, 10)
    inside = {id(p) for p in model.tokens_to_token.parameters()}
    opt = recipe.build_optimizer(model, cfg)
    sched = recipe.build_scheduler(opt, cfg, steps_per_epoch=10)
    for step, ramp in ((0, 0.0), (5, 0.25), (20, 1.0)):
        sched.step_update(step)
        sched_plain = recipe.build_scheduler(torch.optim.AdamW([torch.zeros(1)], lr=cfg.lr), cfg, 10)
        sched_plain.step_update(step)
        lr_now = sched_plain.optimizer.param_groups[0]["lr"]
        for g in opt.param_groups:
            t2t = all(id(p) in inside for p in g["params"])
            assert t2t == ("ramp_epochs" in g)
            assert g["lr"] == pytest.approx(lr_now * (0.1 * ramp if t2t else 1.0))
    torch.save(sched.state_dict(), io.BytesIO())  # checkpoints pickle the scheduler state
    plain = TrainConfig(model=arm.model, model_kwargs=dict(arm.model_kwargs), warmup_epochs=0.0, lr=1e-3)
    assert len(recipe.build_optimizer(model, plain).param_groups) < len(opt.param_groups)


def test_spread_above_limit_is_flagged():
    arms = [a for a in ablation_arms(PRESETS["digits"]) if a.name in ("t2t", "no_t2t")]
    def runs(*top1):
        return [dict(seed=s, val_top1=v, val_top5=99.0, steps=440) for s, v in enumerate(top1)]

    results = {"t2t": runs(70.0, 74.0, 72.0), "no_t2t": runs(90.0, 91.0, 92.5)}
    recipe = dict(data="digits", epochs=10, batch_size=32, lr=1e-3, max_steps=None)
    summary = summarize(arms, results, recipe, "digits", no_profile)
    rows = {r["name"]: r for r in summary["arms"]}
    assert rows["t2t"]["unstable"] and rows["t2t"]["top1_spread"] == pytest.approx(4.0)
    assert not rows["no_t2t"]["unstable"]
    md = markdown_table(summary)
    assert "| 4.0 ⚠ |" in md and "| 2.5 |" in md and "spread above 3 points" in md and "T2T-ViT." in md
    assert "10 epochs of batch 32" in md


def test_photos_are_deterministic_disjoint_and_usable(tmp_path):
    from t2t_vit.data import create_datasets
    from t2t_vit.data.photos import PHOTOS, photo_arrays, write_photo_folder

    tx, ty, vx, vy, names = photo_arrays()
    assert tx.shape == (1500, 32, 32, 3) and vx.shape == (500, 32, 32, 3) and names == list(PHOTOS)
    assert list(np.bincount(ty)) == [150] * 10 and list(np.bincount(vy)) == [50] * 10
    again = photo_arrays()
    assert np.array_equal(again[0], tx) and np.array_equal(again[2], vx)
    train_rows = {t.tobytes() for t in tx}
    assert not any(v.tobytes() in train_rows for v in vx)
    bundle = create_datasets("photos", 32, None)
    assert bundle.kind == "photos" and bundle.num_classes == 10 and bundle.crop_pct == 1.0
    x, y = bundle.val[0]
    assert x.shape == (3, 32, 32) and y == 0
    folder = write_photo_folder(tmp_path / "photos")
    from_folder = create_datasets(str(folder), 32, None, crop_pct=1.0, mean=bundle.mean, std=bundle.std)
    assert from_folder.class_names == names and len(from_folder.train) == 1500
    assert torch.equal(from_folder.val[123][0], bundle.val[123][0]) and from_folder.val[123][1] == bundle.val[123][1]


def test_preset_recipe_file_and_shared_runs(tmp_path, monkeypatch):
    """A preset's recipe file sets the shared training keys and the T2T arms' t2t_* arguments; an arm
    that comes out equal to a variant of another preset trains into the same run."""
    from dataclasses import replace

    import yaml

    from t2t_vit.train.config import recipe_path

    # The digits preset's own pinned recipe, with a longer warm-up and the T2T layers' dropout off.
    shared = yaml.safe_load(open(recipe_path(PRESETS["digits"].config)))
    assert shared["ema_decay"] == 0.998 and shared["scale"] == [0.75, 1.0]  # the published tables' recipe
    recipe_file = tmp_path / "small.yaml"
    recipe_file.write_text(yaml.safe_dump(dict(shared, model="t2t_vit_7", warmup_epochs=2.0, t2t_lr_scale=0.5,
                                               model_kwargs=dict(embed_dim=8, t2t_drop_rate=0.0))))
    monkeypatch.setitem(PRESETS, "small", replace(PRESETS["digits"], config=str(recipe_file)))
    monkeypatch.setattr(experiment, "profile_arm", no_profile)
    calls = []
    kwargs = dict(seeds=1, epochs=2, train_fn=fake_train(calls), log=lambda s: None)
    run_ablation("digits", tmp_path / "out", preset="small", arms=["t2t", "no_t2t"], **kwargs)
    runs = tmp_path / "out" / "runs"
    (t2t_run,), (patch_run,) = ([json.loads(p.read_text()) for p in (runs / arm).glob("*/seed0/budget.json")]
                                for arm in ("t2t", "no_t2t"))
    assert t2t_run["model_kwargs"]["t2t_drop_rate"] == 0.0 and t2t_run["model_kwargs"]["embed_dim"] == 64
    assert "t2t_drop_rate" not in patch_run["model_kwargs"] and patch_run["warmup_epochs"] == 2.0
    assert patch_run["ema_decay"] == 0.998  # from the recipe file, not the trainer's default
    # The T2T module's lr scale is the T2T arm's alone: the patch split trains as before.
    assert t2t_run["t2t_lr_scale"] == 0.5 and patch_run["t2t_lr_scale"] == 1.0
    # The digits preset's arm spelled with the same settings is the very same run: not trained again.
    run_ablation("digits", tmp_path / "out", arms=["t2t:t2t_drop=0:warmup=2.0:t2t_lr=0.5"], **kwargs)
    assert len(calls) == 2


def test_small_data_preset_is_the_digits_preset_with_a_slower_t2t_module():
    """The shipped small-data recipe differs from the ablation's pinned recipe only in the T2T module's lr,
    so its T2T arm is the measured `t2t:t2t_lr=0.1` run and its other arms are the digits preset's."""
    from t2t_vit.experiment.arms import parse_arm
    from t2t_vit.experiment.runner import arm_config, budget_of, preset_recipe

    digits_shared, digits_t2t = preset_recipe(PRESETS["digits"])
    small_shared, small_t2t = preset_recipe(PRESETS["small_data"])
    assert small_shared == digits_shared and digits_t2t == {}
    assert small_t2t == {"t2t_lr_scale": 0.1}
    by_name = {a.name: a for a in ablation_arms(PRESETS["digits"])}
    variant = parse_arm("t2t:t2t_lr=0.1", by_name)
    measured = budget_of(arm_config(variant, 0, digits_shared, digits_t2t), variant)
    preset_arm = by_name["t2t"]
    assert budget_of(arm_config(preset_arm, 0, small_shared, small_t2t), preset_arm) == measured


def test_long_preset_is_the_small_data_model_with_the_literatures_schedule():
    """The long schedule changes the training, not the arms: same widths, same T2T-module lr; 50 epochs
    with RandAugment, mixup/cutmix and drop path as the small-data literature trains."""
    from t2t_vit.experiment.runner import preset_recipe

    short, long = PRESETS["small_data"], PRESETS["small_data_long"]
    assert ablation_arms(short) == ablation_arms(long)
    short_shared, short_t2t = preset_recipe(short)
    long_shared, long_t2t = preset_recipe(long)
    assert long_t2t == short_t2t == {"t2t_lr_scale": 0.1}
    assert long_shared["epochs"] == long.epochs == 50 and short_shared["epochs"] == 10
    assert long_shared["auto_augment"].startswith("rand-m9") and short_shared["auto_augment"] is None
    assert (long_shared["mixup"], long_shared["cutmix"], long_shared["drop_path"]) == (0.8, 1.0, 0.1)

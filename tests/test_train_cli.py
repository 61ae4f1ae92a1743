"""The named model trains: what `t2t-vit train` builds from its flags, and the one-line refusals."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from t2t_vit.reading import read_metadata
from t2t_vit.errors import T2TViTError
from t2t_vit.train import TrainConfig, load_config, recipe, train
from t2t_vit.train.cli import base_recipe

from helpers import BASE, captured_config

TINY_KWARGS = "{embed_dim: 64, depth: 2, num_heads: 2, token_dim: 16}"
FAST = ["--workers", "0", "--threads", "1", "--log-every", "1000", "--epochs", "1", "--batch-size", "8"]


# ---- what gets built ------------------------------------------------------------------------------------
def test_no_arguments_is_the_digits_recipe(monkeypatch):
    cfg = captured_config([], monkeypatch)
    assert cfg == load_config("digits")
    assert (cfg.model, cfg.img_size, cfg.stem, cfg.model_kwargs["embed_dim"]) == ("t2t_vit_7", 32, "small", 128)
    assert captured_config(["--epochs", "2"], monkeypatch).epochs == 2  # flags override the recipe


def test_named_model_is_built_as_registered(monkeypatch):
    cfg = captured_config(["--model", "t2t_vit_14"], monkeypatch)
    assert (cfg.img_size, cfg.stem, cfg.model_kwargs, cfg.data) == (224, "imagenet", {}, "digits")
    model = recipe.build_model(cfg, 1000)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(21.5, abs=0.05)  # paper: 21.5M
    assert model.patch_embed.img_size == (224, 224) if hasattr(model, "patch_embed") else True


def test_size_stem_and_kwargs_change_the_model_on_purpose(monkeypatch):
    cfg = captured_config(["--model", "t2t_vit_14", "--img-size", "64", "--stem", "small",
                           "--model-kwargs", "{depth: 2}"], monkeypatch)
    model = recipe.build_model(cfg, 10)
    assert len(model.blocks) == 2 and model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_timm_models_get_only_their_own_arguments():
    resnet = recipe.build_model(TrainConfig(model="resnet18", img_size=32).validate(), 10)
    assert resnet.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # no img_size, no stem passed
    deit = recipe.build_model(TrainConfig(model="deit_tiny_patch16_224", img_size=32).validate(), 10)
    assert tuple(deit.patch_embed.img_size) == (32, 32)  # a fixed-size model is told the size
    assert TrainConfig(model="resnet18").validate().img_size == 224  # its registered input size
    with pytest.raises(T2TViTError, match="cannot build resnet18"):
        recipe.build_model(TrainConfig(model="resnet18", model_kwargs={"evil": 1}).validate(), 10)


def test_resnet18_trains_two_steps(tmp_path, capsys):
    from t2t_vit.cli import main

    out = tmp_path / "resnet"
    assert main(["train", "--model", "resnet18", "--img-size", "32", "--max-steps", "2", "--no-ema",
                 "--output", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["model"] == "resnet18" and math.isfinite(metrics["val_loss"])
    assert "training resnet18 (11.18M params, 32 px)" in capsys.readouterr().out


def test_data_alone_trains_the_demo_recipe():
    from t2t_vit.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "/some/folder"])
    assert base_recipe(args) == "digits"
    args = build_parser().parse_args(["train", "--model", "t2t_vit_7", "--data", "/some/folder"])
    assert base_recipe(args) is None


def test_config_values_follow_the_field_types():
    cfg = TrainConfig(batch_size="8", lr="2e-3", clip_grad="1", epochs=3.0, img_size=[32, 32]).validate()
    assert (cfg.batch_size, cfg.lr, cfg.clip_grad, cfg.epochs, cfg.img_size) == (8, 2e-3, 1.0, 3, 32)
    assert isinstance(cfg.clip_grad, float) and isinstance(cfg.epochs, int)
    with pytest.raises(T2TViTError, match="--ema must be true or false"):
        TrainConfig(ema="yes").validate()
    with pytest.raises(T2TViTError, match="--model-kwargs must be a mapping"):
        TrainConfig(model_kwargs=[1]).validate()


# ---- one-line refusals, nothing written --------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--batch-size", "2.5"], "--batch-size must be a whole number"),
    (["--model-kwargs", "{evil: 1}"], "takes no argument 'evil'"),
    (["--img-size", "100000"], "--img-size must be at most 4096"),
    (["--model-kwargs", "{a: &x [1, 1], b: *x}"], "aliases"),
    (["--data", "TMP/no_val"], "has no val/ folder"),  # a data error leaves no run directory
    # issue 23, item 12: each of these was a traceback (or, for --lr, a run with a nonsense rate)
    (["--log-every", "0"], "--log-every must be positive"),
    (["--seed", "100000000000000000000000"], "--seed must be in [0, 4294967295]"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--smoothing", "5"], "--smoothing must be in [0, 1)"),
    (["--num-classes", "3"], "--num-classes 3 is fewer than the 10 classes of digits"),
    (["--model-kwargs", "{embed_dim: -4}"], "cannot build t2t_vit_7"),
    (["--model-kwargs", "{num_heads: 7}"], "is not divisible by 7 heads"),
    (["--opt", "sgd", "--momentum", "0"], "--opt sgd is Nesterov SGD, which needs --momentum above 0"),
    (["--lr", "1e300"], "--lr must be in [0, 10.0]"),
    (["--model-kwargs", "[" * 20000 + "]" * 20000], "nests lists or mappings too deeply"),
    (["--config", "TMP/deep.yaml"], "nests lists or mappings too deeply"),
    (["--output", "TMP/\udcff\udcfe"], "is not valid UTF-8"),  # how Python passes the bytes ff fe
    # item 4: a missing path never falls back to the shipped recipe of the same name
    (["--config", "./typo/imagenet_t2t_vit_7.yml"], "config file './typo/imagenet_t2t_vit_7.yml' does not exist"),
    (["--config", "digits.yaml"], "config file 'digits.yaml' does not exist"),
])
def test_bad_values_are_one_line(argv, needle, tmp_path, capsys):
    from t2t_vit.cli import main

    (tmp_path / "no_val" / "train" / "a").mkdir(parents=True)
    (tmp_path / "deep.yaml").write_text("model_kwargs: " + "[" * 20000 + "]" * 20000 + "\n")
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    out = tmp_path / "never"
    assert main(["train", "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["deep.yaml", "no_val"]  # no run directory left behind


@pytest.mark.parametrize("variable, value", [("WORLD_SIZE", "-1"), ("WORLD_SIZE", "0"), ("RANK", "abc"),
                                             ("RANK", "3")])
def test_bad_torchrun_environment_is_one_line(variable, value, tmp_path, capsys, monkeypatch):
    from t2t_vit.cli import main

    monkeypatch.setenv(variable, value)
    out = tmp_path / "never"
    assert main(["train", "--output", str(out), "--max-steps", "1", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{variable}" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_yaml_alias_bomb_in_a_recipe_is_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    bomb.write_text("model_kwargs:\n" + "\n".join("  " + line for line in lines) + "\n")
    with pytest.raises(T2TViTError, match="aliases"):
        load_config(str(bomb))
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(T2TViTError, match="larger than"):
        load_config(str(big))


def test_second_run_on_a_locked_output_is_refused(tmp_path, capsys):
    from t2t_vit.cli import main
    from t2t_vit.train.rundir import lock_output

    out = tmp_path / "run"
    with lock_output(str(out)):
        before = sorted(os.listdir(out))
        assert main(["train", "--output", str(out), "--max-steps", "1", *FAST]) == 2
        assert sorted(os.listdir(out)) == before and (out / ".lock").read_text() == f"{os.getpid()}\n"
    err = capsys.readouterr().err.strip()
    assert f"another training run (pid {os.getpid()}) is using {out}" in err and len(err.splitlines()) == 1


# ---- resume, fine-tuning, distillation, what a run writes -------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    train(TrainConfig(**BASE, output=str(out)))
    return out


def test_checkpoint_records_the_data_config(small_run):
    meta = read_metadata(str(small_run / "checkpoint-last.safetensors"))
    config = meta["data_config"]
    config = json.loads(config) if isinstance(config, str) else config
    assert config["input_size"] == [3, 32, 32] and config["crop_pct"] == 1.0 and config["interpolation"] == "bicubic"
    assert len(config["mean"]) == 3 and len(config["std"]) == 3 and 0 < config["mean"][0] < 1


def test_resume_from_another_size_is_one_line(small_run, tmp_path):
    import shutil

    other = dict(BASE, model_kwargs=dict(BASE["model_kwargs"], embed_dim=32), max_steps=2)
    with pytest.raises(T2TViTError, match="--model-kwargs .* differs from the run's") as info:
        train(TrainConfig(**other, output=str(tmp_path / "x"), resume=str(small_run)))
    assert len(str(info.value).splitlines()) == 1
    run = tmp_path / "no_config"  # without its config.yaml, the weights themselves are compared
    shutil.copytree(small_run, run)
    (run / "config.yaml").unlink()
    with pytest.raises(T2TViTError, match="belong to another model .*config.yaml") as info:
        train(TrainConfig(**other, output=str(tmp_path / "y"), resume=str(run)))
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "0.5", "--epochs", "5", "--batch-size", "7"],
     "--epochs 5 differs from the run's 1, --batch-size 7 differs from the run's 8, --lr 0.5 differs from the run's "
     "0.001; resume takes the run's settings (its config.yaml), or start a new --output"),
    (["--data", "TMP"], "--data "),  # another data set
    (["--opt", "sgd"], "--opt \"sgd\" differs from the run's \"adamw\""),  # was KeyError: 'momentum'
])
def test_resume_refuses_settings_that_cannot_change(argv, needle, small_run, tmp_path, capsys):
    """Issue 23 item 3: a resume with another lr/epochs/batch/data/optimizer ran on silently."""
    import shutil

    from t2t_vit.cli import main

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    assert main(["train", "--output", str(run), "--resume", "auto", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_resume_takes_the_runs_settings_and_announces_what_may_change(small_run, tmp_path, capsys):
    import shutil

    from t2t_vit.cli import main

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    stale = run / ".checkpoint-last.state.pt.k2j4h1.tmp"  # what a SIGKILL in the middle of a write leaves
    stale.write_bytes(b"\0" * 1024)
    # no model flags at all: the run's own config.yaml is the base, not the demo recipe
    assert main(["train", "--output", str(run), "--resume", "auto", "--max-steps", "2", "--log-every", "7"]) == 0
    out = capsys.readouterr().out
    assert "resuming with --max-steps 2 (the run had 1), --log-every 7 (the run had 1000)" in out
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert not stale.exists()  # item 15: removed on resume


def test_resume_from_a_state_missing_keys_is_one_line(small_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    state = torch.load(run / "checkpoint-last.state.pt", weights_only=True)
    del state["optimizer"], state["rng"]
    torch.save(state, run / "checkpoint-last.state.pt")
    with pytest.raises(T2TViTError, match="lacks optimizer, rng"):
        train(TrainConfig(**dict(BASE, max_steps=2), output=str(run), resume="auto"))


@pytest.mark.parametrize("key, value", [("epoch", "abc"), ("position", -3), ("history", 5), ("best", []),
                                        ("epoch_sums", [1.0]), ("train_seconds", float("nan")),
                                        ("rng", [{"python": 1}]), ("scheduler", [1, 2])])
def test_resume_from_a_state_with_malformed_values_is_one_line(key, value, small_run, tmp_path):
    """Issue 23 item 12: such values raised TypeError/KeyError/ValueError deep inside the loop."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    state = torch.load(run / "checkpoint-last.state.pt", weights_only=True)
    state[key] = value
    torch.save(state, run / "checkpoint-last.state.pt")
    with pytest.raises(T2TViTError) as info:
        train(TrainConfig(**dict(BASE, max_steps=2), output=str(run), resume="auto"))
    assert len(str(info.value).splitlines()) == 1
    assert key in str(info.value) or "random-number states" in str(info.value)


def test_compile_and_distillation_say_they_are_on(small_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the message, not the compiler
    teacher = str(small_run / "checkpoint-last.safetensors")
    train(TrainConfig(**BASE, output=str(tmp_path / "d"), compile=True, teacher=teacher, distill_alpha=0.3))
    out = capsys.readouterr().out
    assert "compiling the model with torch.compile" in out
    assert f"distillation on: teacher {teacher}, soft targets, alpha 0.3, tau 1" in out


def test_finetune_from_a_pretrained_tag(tmp_path, monkeypatch, capsys):
    import t2t_vit
    from t2t_vit.cli import main

    real, calls = t2t_vit.create_model, []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs["num_classes"]))
        return real(name.split(".")[0], **kwargs)

    monkeypatch.setattr(t2t_vit, "create_model", create_model)
    out = tmp_path / "tuned"
    assert main(["train", "--finetune", "t2t_vit_7.in1k", "--model-kwargs", TINY_KWARGS, "--img-size", "32",
                 "--stem", "small", "--max-steps", "1", "--output", str(out), *FAST]) == 0
    assert calls[0] == ("t2t_vit_7.in1k", True, 10)
    assert "fine-tuning from the pretrained weights t2t_vit_7.in1k" in capsys.readouterr().out
    assert read_metadata(str(out / "checkpoint-last.safetensors"))["model"] == "t2t_vit_7"
    with pytest.raises(T2TViTError, match="holds a t2t_vit_7 but --model is t2t_vit_14"):
        TrainConfig(model="t2t_vit_14", finetune="t2t_vit_7.in1k").validate()


def test_a_teacher_named_without_a_checkpoint_teaches_with_its_released_weights(monkeypatch):
    """A name or tag alone used to build the architecture with random weights, which teaches noise."""
    import timm
    import t2t_vit
    from t2t_vit.errors import T2TViTError
    from t2t_vit.train import distill
    from t2t_vit.train.config import TrainConfig

    asked = []

    def create(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        return timm.models.create_model("resnet10t", num_classes=10 if "ten" in name else 1000)

    monkeypatch.setattr(t2t_vit, "create_model", create)
    monkeypatch.setattr(timm, "create_model", create)
    for name in ("t2t_vit_14.in1k", "t2t_vit_14", "resnet18.a1_in1k"):
        cfg = TrainConfig(model="t2t_vit_7", teacher=name).validate()
        with pytest.raises(T2TViTError, match="predicts 1000 classes but the data set has 10"):
            distill.build_teacher(cfg, 10, torch.device("cpu"))
    assert asked == [("t2t_vit_14.in1k", True), ("t2t_vit_14", True), ("resnet18.a1_in1k", True)]
    teacher = distill.build_teacher(TrainConfig(model="t2t_vit_7", teacher="resnet18.ten").validate(), 10,
                                    torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

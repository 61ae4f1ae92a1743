"""Each training setting decided once: the config validated once on every entry path, a model source
parsed once at the edge, each field's rules declared once (train/config.py, modelsource.py, train/checks.py)."""
from __future__ import annotations

import pytest

from t2t_vit.errors import T2TViTError
from t2t_vit.train import TrainConfig, load_config, train

from helpers import BASE, captured_config


def test_config_is_validated_once_on_every_entry_path(monkeypatch, tmp_path):
    import dataclasses

    import t2t_vit.train.engine as engine
    from t2t_vit.cli import main
    from t2t_vit.train import checks

    real, calls = checks.check_model, []
    monkeypatch.setattr(checks, "check_model", lambda cfg, *a: calls.append(cfg.model) or real(cfg, *a))

    class Started(Exception):
        pass

    def init_world(device):
        raise Started  # validation is over once the run starts

    monkeypatch.setattr(engine, "init_world", init_world)
    out = str(tmp_path / "run")
    for entry in (lambda: main(["train", "--output", out]), lambda: train(load_config("digits", dict(output=out))),
                  lambda: train(TrainConfig(**BASE, output=out))):
        calls.clear()
        with pytest.raises(Started):
            entry()
        assert calls == ["t2t_vit_7"]
    cfg = load_config("digits")
    with pytest.raises(dataclasses.FrozenInstanceError, match="read-only"):
        cfg.lr = -1.0  # a validated config cannot be changed into an invalid one behind train's back
    with pytest.raises(T2TViTError, match="--lr must be positive"):
        dataclasses.replace(cfg, lr=-1.0)  # a changed copy is validated again


def test_model_source_is_parsed_once_at_the_edge(tmp_path, monkeypatch):
    from t2t_vit.modelsource import ModelSource

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    assert ModelSource.parse(str(weights)) == ModelSource("file", str(weights))
    assert ModelSource.parse("t2t_vit_7.in1k") == ModelSource("tag", "t2t_vit_7.in1k", "t2t_vit_7", "in1k")
    assert ModelSource.parse("t2t_vit_7").kind == "name"
    assert ModelSource.parse("resnet18.a1_in1k").kind == "name"  # only T2T-ViT tags are fine-tuning sources
    real, parsed = ModelSource.parse.__func__, []
    monkeypatch.setattr(ModelSource, "parse", classmethod(lambda cls, text: parsed.append(text) or real(cls, text)))
    cfg = captured_config(["--finetune", "t2t_vit_7.in1k"], monkeypatch)
    assert parsed == ["t2t_vit_7.in1k"]  # the command line's parse is the one the config keeps
    assert (cfg.model, cfg.finetune, cfg.finetune_source.kind) == ("t2t_vit_7", "t2t_vit_7.in1k", "tag")
    assert cfg.teacher_source is None


def test_each_fields_rules_drive_both_the_help_and_the_checks(capsys):
    """A field's sign, bounds and choices are declared once (checks.option on TrainConfig); the flags'
    help and the validation both follow them."""
    import dataclasses

    from t2t_vit.cli import main
    from t2t_vit.train.checks import rules

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    declared = [(f.name, rules(f)) for f in dataclasses.fields(TrainConfig)]
    assert sum(1 for _, r in declared if r.sign or r.bounds or r.choices) >= 30
    for name, rule in declared:
        if rule.choices:
            assert f"one of {', '.join(rule.choices)}" in text
            with pytest.raises(T2TViTError, match=f"--{name.replace('_', '-')} must be one of"):
                TrainConfig(**{name: "bogus"}).validate()
        if rule.help:
            assert " ".join(rule.help.split()) in text
        if rule.sign == "positive":
            with pytest.raises(T2TViTError, match="must be positive, got 0"):
                TrainConfig(**{name: 0}).validate()
        if rule.sign == "not negative":
            with pytest.raises(T2TViTError, match="must not be negative, got -1"):
                TrainConfig(**{name: -1}).validate()
        if rule.bounds:
            with pytest.raises(T2TViTError, match=rf"must be in \[{rule.bounds[0]}, {rule.bounds[1]}"):
                TrainConfig(**{name: rule.bounds[1] + 1}).validate()

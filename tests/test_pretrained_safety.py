"""Hostile or broken checkpoint files: one line (exit 2 from the CLI), nothing half-written, no
remote source chosen by a file, no huge allocation asked for by metadata."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import t2t_vit
from t2t_vit import cli
from t2t_vit.checkpoint import load_checkpoint, model_from_checkpoint
from t2t_vit.errors import T2TViTError
from t2t_vit.pretrained import convert, from_pretrained, save_pretrained
from t2t_vit.reading import read_metadata, read_state_dict
from t2t_vit.storage import encode_metadata, save_weights

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=32, stem="small")
DEMO_KWARGS = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, stem="small")


def small(num_classes: int = 10, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return t2t_vit.create_model("t2t_vit_7", num_classes=num_classes, **{**SMALL, **kwargs}).eval()


def ours(tmp_path: Path, name: str = "ours.safetensors", **meta) -> Path:
    """One of our checkpoints of a demo-sized model, with ``meta`` over its honest metadata."""
    model = small(**{k: v for k, v in DEMO_KWARGS.items() if k not in SMALL})
    metadata = dict(format="t2t-vit", model="t2t_vit_7", model_kwargs=DEMO_KWARGS, num_classes=10,
                    img_size=[32, 32], preferred="model")
    metadata.update(meta)
    return save_weights(model, tmp_path / name, metadata=metadata)


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


def cli_fails(capsys, argv: list[str], *parts: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("t2t-vit: error: ") and all(p in err for p in parts), err


# ---- metadata values -------------------------------------------------------------------------
BAD_METADATA = [
    (dict(img_size="abc"), "img_size is not valid JSON"),
    (dict(img_size=32.5), "img_size must be an integer"),
    (dict(img_size=100000), "img_size=100000 is out of range"),
    (dict(model_kwargs=[1, 2]), "model_kwargs must be a mapping"),
    (dict(model_kwargs={**DEMO_KWARGS, "evil": 1}), "model_kwargs has arguments t2t_vit_7 does not take: evil"),
    (dict(model_kwargs={**DEMO_KWARGS, "depth": 100000}), "model_kwargs.depth=100000 is out of range"),
    (dict(model_kwargs={**DEMO_KWARGS, "depth": 256, "embed_dim": 8192}), "over the 1,000,000,000 limit"),
    (dict(num_classes="abc"), "num_classes is not valid JSON"),
    (dict(num_classes=1e11), "num_classes must be an integer"),
    (dict(class_names=5), "class_names must be a list of strings"),
    (dict(model="no_such_model"), "unknown model 'no_such_model'"),
    (dict(model=7), "unknown model '7'"),
    (dict(data_config={"mean": "x"}), "data_config.mean must be a list"),
    (dict(data_config={"interpolation": "evil"}), "data_config.interpolation must be one of"),
    (dict(data_config=[1]), "data_config must be a mapping"),
]


@pytest.mark.parametrize("meta,message", BAD_METADATA, ids=[m for _, m in BAD_METADATA])
def test_bad_metadata_is_one_line(tmp_path, capsys, meta, message):
    raw = {k: v if not isinstance(v, str) or k == "model" else v for k, v in meta.items()}
    if meta.get("img_size") == "abc" or meta.get("num_classes") == "abc":
        path = ours(tmp_path)  # write the raw (non-JSON) string by hand
        tensors = safetensors.torch.load_file(str(path))
        header = encode_metadata(dict(format="t2t-vit", model="t2t_vit_7", model_kwargs=DEMO_KWARGS))
        header.update({k: v for k, v in meta.items()})
        safetensors.torch.save_file(tensors, str(path), metadata=header)
    else:
        path = ours(tmp_path, **raw)
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path)
    one_line(err, message)
    out = tmp_path / "out.safetensors"
    cli_fails(capsys, ["convert", str(path), str(out)], message)
    assert not out.exists()


def test_unrecorded_fields_are_absent(tmp_path):
    path = ours(tmp_path, img_size=None, stem="", data_config=None)
    meta = read_metadata(path)
    assert "img_size" not in meta and "stem" not in meta and "data_config" not in meta
    assert model_from_checkpoint(path).img_size == (32, 32)  # from model_kwargs


def test_metadata_never_selects_a_remote_source(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a model was built from a remote-source name")

    names = ("hf-hub:evil/model", "local-dir:/tmp/x", "timm/vit_base_patch16_224", "http://evil/x")
    paths = [ours(tmp_path, f"{i}.safetensors", model=name) for i, name in enumerate(names)]
    monkeypatch.setattr(timm, "create_model", no_build)
    for path in paths:
        with pytest.raises(T2TViTError) as err:
            model_from_checkpoint(path)
        one_line(err, "names a source, not a model", "never selects where weights come from")


def test_data_config_is_validated_stored_and_restored(tmp_path):
    data = dict(input_size=[3, 32, 32], mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5], crop_pct=1.0,
                interpolation="bilinear")
    path = ours(tmp_path, data_config=data)
    assert read_metadata(path)["data_config"] == data
    model, meta = model_from_checkpoint(path, with_metadata=True)
    save_pretrained(model, tmp_path / "dir", data_config=meta["data_config"])
    cfg = json.loads((tmp_path / "dir" / "config.json").read_text())["pretrained_cfg"]
    assert {k: cfg[k] for k in data} == data
    stored = read_metadata(tmp_path / "dir")["data_config"]
    assert {k: stored[k] for k in data} == data
    for loaded in (from_pretrained(tmp_path / "dir"), timm.create_model(f"local-dir:{tmp_path / 'dir'}", pretrained=True)):
        resolved = timm.data.resolve_data_config(model=loaded)
        assert tuple(resolved["mean"]) == (0.1, 0.2, 0.3) and resolved["interpolation"] == "bilinear"
        assert resolved["crop_pct"] == 1.0 and tuple(resolved["input_size"]) == (3, 32, 32)
    converted = convert(path, tmp_path / "converted.safetensors")
    assert read_metadata(tmp_path / "converted.safetensors")["data_config"] == data == converted["data_config"]
    bad = ours(tmp_path, "bad.safetensors", data_config={**data, "std": [0.5, 0.0, 0.5]})
    with pytest.raises(T2TViTError) as err:
        read_metadata(bad)
    one_line(err, "data_config.std=0.0 is out of range")


# ---- broken files ----------------------------------------------------------------------------
def test_safetensors_header_past_the_file(tmp_path, capsys):
    good = ours(tmp_path)
    blob = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((len(blob) * 10).to_bytes(8, "little") + blob[8:])
    (tmp_path / "dir").mkdir()
    os.symlink(bad, tmp_path / "dir" / "model.safetensors")
    for target in (bad, tmp_path / "dir"):
        for attempt in (read_metadata, read_state_dict, model_from_checkpoint,
                        lambda p: load_checkpoint(small(), p)):
            with pytest.raises(T2TViTError) as err:
                attempt(target)
            one_line(err, "truncated or corrupt safetensors file", "header declares")
    cli_fails(capsys, ["convert", str(tmp_path / "dir"), str(tmp_path / "o.safetensors")], "truncated or corrupt")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("shape", [(1, 0, 256), (256,), (2, 5, 256)], ids=["empty", "1d", "batch2"])
def test_bad_position_table(tmp_path, shape):
    state = small().state_dict()
    state["pos_embed"] = torch.zeros(shape)
    path = save_weights(state, tmp_path / "pos.safetensors", metadata=dict(format="t2t-vit"))
    with pytest.raises(T2TViTError) as err:
        load_checkpoint(small(), path)
    one_line(err, f"pos_embed has shape {list(shape)}")


def test_non_string_state_dict_keys(tmp_path):
    path = tmp_path / "ints.pth"
    torch.save({1: torch.zeros(2), "cls_token": torch.zeros(1, 1, 256)}, path)
    with pytest.raises(T2TViTError) as err:
        read_state_dict(path)
    one_line(err, "has a int key (1)")


@pytest.mark.parametrize("text,message", [
    ("{", "not valid JSON"), ("[]", "must hold a JSON object"), ('{"architecture": 5}', "architecture must be a str"),
    ('{"architecture": "t2t_vit_7", "model_args": [1]}', "model_args must be a dict"),
    ('{"num_classes": 10}', "does not name its architecture"),
    ('{"architecture": "hf-hub:evil/x"}', "names a source"),
])
def test_from_pretrained_malformed_config(tmp_path, text, message):
    directory = tmp_path / "dir"
    save_pretrained(small(), directory)
    (directory / "config.json").write_text(text)
    with pytest.raises(T2TViTError) as err:
        from_pretrained(directory)
    one_line(err, message)


# ---- the model a file describes -------------------------------------------------------------------
def test_convert_and_torch_hub_honour_model_kwargs(tmp_path, capsys):
    path = ours(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    expected = model_from_checkpoint(path).eval()(x)
    assert cli.main(["convert", str(path), str(tmp_path / "c.safetensors")]) == 0
    torch.testing.assert_close(model_from_checkpoint(tmp_path / "c.safetensors").eval()(x), expected, rtol=0, atol=0)
    hub = torch.hub.load(str(REPO), "t2t_vit_7", source="local", checkpoint_path=str(path), trust_repo=True)
    assert hub.embed_dim == 64 and len(hub.blocks) == 2
    torch.testing.assert_close(hub.eval()(x), expected, rtol=0, atol=0)


def test_authors_file_names_its_model_and_size(tmp_path):
    torch.manual_seed(3)
    ema = t2t_vit.create_model("t2t_vit_7", img_size=64).eval()
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save({"state_dict_ema": {"module." + k: v for k, v in ema.state_dict().items()}, "arch": "T2t_vit_7",
                "args": argparse.Namespace(model="T2t_vit_7", img_size=64)}, path)
    model = model_from_checkpoint(path)  # no name: the authors' arch says it
    assert model.pretrained_cfg["architecture"] == "t2t_vit_7" and model.img_size == (64, 64)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), ema(x), rtol=0, atol=0)
    # without args.img_size the position table's length says it (8x8 tokens → 128 px)
    torch.manual_seed(4)
    wide = t2t_vit.create_model("t2t_vit_7", img_size=128, num_classes=10).eval()
    torch.save({"net": {"module." + k: v for k, v in wide.state_dict().items()}}, tmp_path / "cifar.pth")
    rebuilt = model_from_checkpoint(tmp_path / "cifar.pth")
    assert rebuilt.img_size == (128, 128) and rebuilt.num_classes == 10


def test_class_count_mismatch_checked_once(tmp_path):
    path = ours(tmp_path)
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path, num_classes=3)
    one_line(err, "has a 10-class head but the model was built with 3 classes")
    model = t2t_vit.create_model("t2t_vit_7", num_classes=3, **{k: v for k, v in DEMO_KWARGS.items()})
    assert load_checkpoint(model, path).replaced_head == (10, 3)
    with pytest.raises(T2TViTError, match="10-class head"):
        load_checkpoint(model, path, new_head=False)

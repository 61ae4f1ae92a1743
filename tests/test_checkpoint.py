"""Checkpoint reading/writing: every format round-trips to identical logits, adaptation is exact,
mismatches fail with one clear line, and pickled code never runs."""
from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import t2t_vit
from t2t_vit import cli
from t2t_vit.checkpoint import load_checkpoint
from t2t_vit.errors import T2TViTError
from t2t_vit.pretrained import convert, from_pretrained, save_pretrained
from t2t_vit.reading import read_metadata, read_state_dict
from t2t_vit.storage import save_weights

torch.set_num_threads(1)
SMALL = dict(img_size=32, stem="small")


def small_model(name: str = "t2t_vit_7", num_classes: int = 10, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return t2t_vit.create_model(name, num_classes=num_classes, **{**SMALL, **kwargs}).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every tensor (frozen pos_embed and Performer w too), so a load that skips one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_dict().values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def authors_layout(ema: torch.nn.Module, plain: torch.nn.Module) -> dict:
    prefix = lambda m: {"module." + k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
    return {
        "state_dict_ema": prefix(ema), "state_dict": prefix(plain), "epoch": 3, "arch": "T2t_vit_7",
        "args": argparse.Namespace(model="T2t_vit_7", lr=1e-3, img_size=224), "metric": 71.7,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
    }


# ---- formats -------------------------------------------------------------------------------
def test_ours_round_trip_follows_preferred(tmp_path, images):
    model, ema = small_model(seed=0), randomize(small_model(seed=0), 7)
    meta = dict(format="t2t-vit", model="t2t_vit_7", model_kwargs=SMALL, num_classes=10, img_size=[32, 32],
                class_names=[str(i) for i in range(10)], preferred="ema", step=120)
    path = save_weights(model, tmp_path / "run.safetensors", metadata=meta, ema=ema)
    with safetensors.safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    # frozen tensors are part of the weights, and the EMA copy sits under `ema.`
    assert {"pos_embed", "tokens_to_token.attention1.w", "ema.pos_embed", "ema.tokens_to_token.attention2.w"} <= keys
    assert read_metadata(path) == {**meta, "model_kwargs": SMALL}
    for use_ema, source in ((None, ema), (True, ema), (False, model)):
        fresh = small_model(seed=5)
        report = load_checkpoint(fresh, path, use_ema=use_ema)
        assert report.ok and report.source == ("model" if source is model else "ema")
        torch.testing.assert_close(logits(fresh, images), logits(source, images), rtol=0, atol=0)
    save_weights(model, path, metadata={**meta, "preferred": "model"}, ema=ema)
    assert torch.equal(read_state_dict(path)["pos_embed"], model.pos_embed)


def test_authors_pth_tar_prefers_ema_and_strips_module(tmp_path, images):
    ema, plain = small_model(seed=1), small_model(seed=2)
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save(authors_layout(ema, plain), path)
    fresh = small_model(seed=3)
    report = load_checkpoint(fresh, path)
    assert report.source == "state_dict_ema"
    torch.testing.assert_close(logits(fresh, images), logits(ema, images), rtol=0, atol=0)
    load_checkpoint(fresh, path, use_ema=False)
    torch.testing.assert_close(logits(fresh, images), logits(plain, images), rtol=0, atol=0)
    built = t2t_vit.create_model("t2t_vit_7", num_classes=10, checkpoint_path=str(path), **SMALL)
    torch.testing.assert_close(logits(built, images), logits(ema, images), rtol=0, atol=0)
    meta = read_metadata(path)
    assert meta["format"] == "authors" and meta["epoch"] == 3 and meta["args"]["model"] == "T2t_vit_7"
    assert meta["has_ema"] is True


def test_authors_cifar_net_layout(tmp_path, images):
    src = small_model(seed=4)
    path = tmp_path / "cifar10_t2t_vit_7.pth"
    torch.save({"net": {"module." + k: v for k, v in src.state_dict().items()}, "acc": 97.5, "epoch": 59}, path)
    fresh = small_model(seed=5)
    assert load_checkpoint(fresh, path).source == "net"
    torch.testing.assert_close(logits(fresh, images), logits(src, images), rtol=0, atol=0)
    assert read_metadata(path)["format"] == "authors-cifar"


def test_plain_safetensors_and_shared_tensors(tmp_path, images):
    src = small_model(seed=6)
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    fresh = small_model(seed=7)
    load_checkpoint(fresh, path)
    torch.testing.assert_close(logits(fresh, images), logits(src, images), rtol=0, atol=0)
    # tied and non-contiguous tensors: save_weights stores each as its own contiguous copy
    base = torch.arange(12.0).reshape(3, 4)
    window = torch.arange(10.0)[2:6]  # contiguous, but an offset into a larger storage
    save_weights({"a": base, "b": base, "c": base.t(), "d": window}, tmp_path / "shared.safetensors")
    out = read_state_dict(tmp_path / "shared.safetensors")
    assert torch.equal(out["a"], base) and torch.equal(out["b"], base) and torch.equal(out["c"], base.t())
    assert torch.equal(out["d"], torch.tensor([2.0, 3.0, 4.0, 5.0]))


# ---- adaptation ----------------------------------------------------------------------------
def cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution, half-pixel centres, edge-clamped taps: the (n_out, n_in) resampler."""
    def weight(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), n_in - 1)] += weight(src - tap)
    return m


def reference_resample(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    grid = pos[0, 1:].double().numpy().reshape(old[0], old[1], -1)
    out = np.einsum("ih,hwc,jw->ijc", cubic_matrix(old[0], new[0]), grid, cubic_matrix(old[1], new[1]))
    return torch.cat([pos[:, :1].double(), torch.from_numpy(out.reshape(1, -1, pos.shape[-1]))], 1).float()


def test_pos_embed_resampled_224_to_384_like_the_authors(tmp_path):
    torch.manual_seed(0)
    src = t2t_vit.create_model("t2t_vit_7", img_size=224)
    with torch.no_grad():
        src.pos_embed.normal_()  # not the sinusoid: any row mix-up shows
    save_weights(src, tmp_path / "224.safetensors")
    dst = t2t_vit.create_model("t2t_vit_7", img_size=384)
    report = load_checkpoint(dst, tmp_path / "224.safetensors")
    assert report.resampled_pos_embed == ((14, 14), (24, 24)) and dst.pos_embed.shape == (1, 577, 256)
    torch.testing.assert_close(dst.pos_embed, reference_resample(src.pos_embed, (14, 14), (24, 24)),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # the cls row is kept as is


def test_pos_embed_resampled_non_square_with_metadata(tmp_path, images):
    src = small_model(seed=8, img_size=(32, 48))
    with torch.no_grad():
        src.pos_embed.normal_()
    meta = dict(format="t2t-vit", img_size=[32, 48], model="t2t_vit_7")
    path = save_weights(src, tmp_path / "wide.safetensors", metadata=meta)
    dst = small_model(seed=9, img_size=(48, 32))  # 8x12 grid → 12x8 grid, both 96 tokens
    assert load_checkpoint(dst, path).resampled_pos_embed == ((8, 12), (12, 8))
    torch.testing.assert_close(dst.pos_embed, reference_resample(src.pos_embed, (8, 12), (12, 8)),
                               rtol=1e-5, atol=1e-5)


def test_head_replaced_on_class_count_change(tmp_path, images, caplog):
    src = small_model(num_classes=10, seed=10)
    path = save_weights(src, tmp_path / "ten.safetensors")
    dst = small_model(num_classes=5, seed=11)
    fresh_head = dst.head.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="t2t_vit.adapting"):
        report = load_checkpoint(dst, path)
    assert report.replaced_head == (10, 5)
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint has a 10-class head, the model 5 classes: keeping the model's new head"]
    assert torch.equal(dst.head.weight, fresh_head)
    torch.testing.assert_close(dst.forward_head(dst.forward_features(images), pre_logits=True),
                               src.forward_head(src.forward_features(images), pre_logits=True), rtol=0, atol=0)


# ---- refusals ------------------------------------------------------------------------------
def test_wrong_architecture_one_clear_line(tmp_path):
    path = save_weights(small_model("t2t_vit_14", seed=12), tmp_path / "t2t_vit_14.safetensors")
    with pytest.raises(T2TViTError) as err:
        load_checkpoint(small_model("t2t_vit_7"), path)
    msg = str(err.value)
    assert "\n" not in msg and "does not fit t2t_vit_7" in msg
    assert "checkpoint is for a model of width 384, depth 14, MLP width 1152" in msg
    assert "this model has width 256, depth 7, MLP width 512" in msg and "looks like t2t_vit_14" in msg
    assert "7 unexpected keys: blocks.7." in msg and "shape mismatches" in msg and "(+" in msg
    assert len(msg) < 1000  # truncated, not 100 keys long
    # a checkpoint for the 224 px stem in a small-stem model names the stem
    path = save_weights(t2t_vit.create_model("t2t_vit_7", num_classes=10), tmp_path / "imagenet_stem.safetensors")
    with pytest.raises(T2TViTError, match="first soft-split width 147, this model has first soft-split width 27"):
        load_checkpoint(small_model("t2t_vit_7"), path)
    # strict=False loads what fits and reports the rest
    report = load_checkpoint(small_model("t2t_vit_7"), path, strict=False)
    assert report.mismatched and not report.ok


class Payload:
    """Unpickling this creates a file: the stand-in for a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickle_payload_refused_and_never_runs(tmp_path, zipfile):
    state = small_model("t2t_vit_7").state_dict()
    live, target = tmp_path / "proof_payload_is_live", tmp_path / "pwned"
    torch.save({"state_dict": state, "args": Payload(str(live))}, tmp_path / "live.pth",
               _use_new_zipfile_serialization=zipfile)
    torch.load(tmp_path / "live.pth", weights_only=False)
    assert live.exists()  # the payload really runs when a file like this is unpickled unsafely
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": state, "args": Payload(str(target))}, path, _use_new_zipfile_serialization=zipfile)
    for attempt in (lambda: load_checkpoint(small_model("t2t_vit_7"), path), lambda: read_metadata(path),
                    lambda: read_state_dict(path), lambda: convert(path, tmp_path / "out.safetensors")):
        with pytest.raises(T2TViTError, match=r"refusing to load .*could run code \(.*open.*\)"):
            attempt()
    with pytest.raises(T2TViTError, match="refusing to load"):  # a file timm hands us is read by our reader first
        timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert not target.exists()


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(T2TViTError, match="not a PyTorch or safetensors checkpoint"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(T2TViTError, match="checkpoint not found"):
        read_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(T2TViTError, match="no EMA weights"):
        read_state_dict(save_weights(small_model(), tmp_path / "m.safetensors"), use_ema=True)


# ---- timm, pretrained directories, convert -------------------------------------------------
def test_timm_pretrained_file_path(tmp_path, images):
    model, ema = small_model(seed=13), randomize(small_model(seed=13), 3)
    ours = save_weights(model, tmp_path / "ours.safetensors", metadata={"format": "t2t-vit", "preferred": "model"},
                        ema=ema)
    authors = tmp_path / "authors.pth.tar"
    torch.save(authors_layout(ema, model), authors)
    cifar = tmp_path / "cifar.pth"
    torch.save({"net": {"module." + k: v for k, v in ema.state_dict().items()}, "acc": 90.0}, cifar)
    for path, expected in ((ours, model), (authors, ema), (cifar, ema)):
        loaded = timm.create_model("t2t_vit_7", pretrained=True, num_classes=10,
                                   pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **SMALL)
        torch.testing.assert_close(logits(loaded, images), logits(expected, images), rtol=0, atol=0)
    # a new class count keeps timm's fresh head; features_only works through the filter too
    three = timm.create_model("t2t_vit_7", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(ours)), **SMALL).eval()
    assert three.head.out_features == 3
    torch.testing.assert_close(three.forward_head(three.forward_features(images), pre_logits=True),
                               model.forward_head(model.forward_features(images), pre_logits=True))
    feats = timm.create_model("t2t_vit_7", pretrained=True, features_only=True, out_indices=(-1,),
                              pretrained_cfg_overlay=dict(file=str(authors)), **SMALL)
    torch.testing.assert_close(feats.eval()(images)[-1], ema.forward_intermediates(images, indices=[-1])[1][-1])
    with pytest.raises(T2TViTError, match="does not fit t2t_vit_10"):
        timm.create_model("t2t_vit_10", pretrained=True, pretrained_cfg_overlay=dict(file=str(ours)), **SMALL)


@pytest.mark.parametrize("kind", ["authors", "ours"])
def test_a_local_file_is_read_once_before_the_model_is_built(tmp_path, monkeypatch, images, kind):
    """``pretrained_cfg_overlay=dict(file=)`` and ``checkpoint_path=``: our code reads the file once
    (its defaults, the metadata screen and timm's filter share that read); timm's own load is the other."""
    from t2t_vit import reading

    model = small_model(seed=17)
    if kind == "authors":
        path = tmp_path / "authors.pth.tar"
        torch.save(authors_layout(model, model), path)
        reader = "torch_load_safe"  # the whole pickle is unpickled on each read
    else:
        path = save_weights(model, tmp_path / "ours.safetensors", metadata={"format": "t2t-vit", "preferred": "model"})
        reader = "safe_open"  # the header (metadata) of a safetensors file
    reads = []
    real = getattr(reading, reader)
    monkeypatch.setattr(reading, reader, lambda *args, **kwargs: reads.append(args[0]) or real(*args, **kwargs))
    loaded = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert len(reads) == 1, reads
    torch.testing.assert_close(logits(loaded, images), logits(model, images), rtol=0, atol=0)
    reads.clear()
    loaded = t2t_vit.create_model("t2t_vit_7", checkpoint_path=str(path), **SMALL)
    assert len(reads) == 1, reads
    torch.testing.assert_close(logits(loaded, images), logits(model, images), rtol=0, atol=0)


def test_save_pretrained_loads_in_ours_and_timm(tmp_path, images):
    src = small_model(seed=14)
    names = [f"class_{i}" for i in range(10)]
    save_pretrained(src, tmp_path / "pretrained", class_names=names, data_config=dict(mean=(0.5,) * 3, std=(0.25,) * 3))
    config = json.loads((tmp_path / "pretrained" / "config.json").read_text())
    assert config["architecture"] == "t2t_vit_7" and config["num_classes"] == 10
    assert config["model_args"]["img_size"] == [32, 32] and config["model_args"]["stem"] == "small"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["label_names"] == names
    ours = from_pretrained(tmp_path / "pretrained")
    theirs = timm.create_model(f"local-dir:{tmp_path / 'pretrained'}", pretrained=True).eval()
    for loaded in (ours, theirs):
        torch.testing.assert_close(logits(loaded, images), logits(src, images), rtol=0, atol=0)
        assert tuple(loaded.pretrained_cfg["mean"]) == (0.5,) * 3 and tuple(loaded.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert read_metadata(tmp_path / "pretrained")["class_names"] == names
    assert from_pretrained(tmp_path / "pretrained", num_classes=3).head.out_features == 3


def test_convert_cli(tmp_path, monkeypatch, capsys):
    torch.manual_seed(15)
    ema, plain = t2t_vit.create_model("t2t_vit_7"), t2t_vit.create_model("t2t_vit_7")
    src = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save(authors_layout(ema, plain), src)
    out = tmp_path / "t2t_vit_7.safetensors"
    assert cli.main(["convert", str(src), str(out)]) == 0
    assert "t2t_vit_7, 1000 classes, 224x224 px, weights from 71.7_T2T_ViT_7.pth.tar:state_dict_ema" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["format"] == "t2t-vit" and meta["model"] == "t2t_vit_7" and meta["epoch"] == 3
    converted = read_state_dict(out)
    assert converted.keys() == ema.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in ema.state_dict().items())
    assert cli.main(["convert", str(src), str(tmp_path / "x.safetensors"), "--model", "t2t_vit_14"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("t2t-vit: error: checkpoint") and "width 256" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_checkpoint_metadata_comes_from_the_one_field_table(tmp_path):
    """Every writer's metadata is built by metadata.checkpoint_metadata: our format, the table's names and order."""
    from t2t_vit.metadata import FIELDS, FORMAT, checkpoint_metadata

    meta = checkpoint_metadata(step=3, class_names=["a"], model="m")
    assert list(meta) == ["format", "model", "class_names", "step"] and meta["format"] == FORMAT
    with pytest.raises(TypeError, match="modle"):
        checkpoint_metadata(modle="m")
    save_pretrained(small_model(seed=16), tmp_path / "pretrained")
    with safetensors.safe_open(str(tmp_path / "pretrained" / "model.safetensors"), "pt") as f:
        written = f.metadata()
    assert written["format"] == FORMAT and set(written) <= set(FIELDS)


def test_the_registered_models_are_the_core_table():
    """variants registers table.VARIANTS itself (the core's table, no copy), every row of it."""
    from t2t_vit.table import VARIANTS
    from t2t_vit.variants import VARIANTS as registered
    assert registered is VARIANTS and set(VARIANTS) == set(t2t_vit.list_models())


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14", "t2t_vit_c_14", "vit_s16"])
def test_three_channel_checkpoint_fits_a_grey_model(name):
    """timm's ``in_chans`` convention: a 3-channel checkpoint loads into a 1-channel model by
    summing the first layer's channel blocks, so a grey image gives what the RGB model gives for
    that image repeated into three channels; other channel counts load too."""
    from t2t_vit.adapting import adapt_state_dict

    torch.manual_seed(0)
    kwargs = dict(num_classes=5, depth=1)
    rgb = t2t_vit.create_model(name, **kwargs).eval()
    grey = t2t_vit.create_model(name, in_chans=1, **kwargs).eval()
    state, report = adapt_state_dict(rgb.state_dict(), grey)
    assert report.ok and report.adapted_input_channels == (3, 1)
    grey.load_state_dict(state)
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)
    _, report = adapt_state_dict(rgb.state_dict(), t2t_vit.create_model(name, in_chans=4, **kwargs))
    assert report.ok and report.adapted_input_channels == (3, 4)

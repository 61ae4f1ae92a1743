"""Issue 23, local files: a file never asks for a model over the size limit; non-finite weights,
zip bombs, bytes that are no checkpoint and wrong arguments are one line, never a traceback or a
huge allocation. (Sources and downloads: tests/test_safety_downloads.py.)"""
from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import pytest
import timm
import torch

import t2t_vit
from t2t_vit import cli
from t2t_vit.checkpoint import model_from_checkpoint
from t2t_vit.errors import T2TViTError
from t2t_vit.pretrained import save_pretrained
from t2t_vit.reading import check_zip_bounds
from t2t_vit.storage import save_weights

from helpers import GARBAGE, SMALL, authors_file, image, one_line, poisoned, small


# ---- item 1: a file never asks for a model over the size limit --------------------------------
def test_oversized_tagged_model_is_refused_before_any_module_is_built(tmp_path, monkeypatch):
    """A tagged name used to skip the size estimate (a 17 GB allocation); now nothing is built."""
    path = poisoned(tmp_path, "t2t_vit_7.in1k", depth=256, embed_dim=8192)
    built = []
    original = torch.nn.Module.__init__
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *a, **k: (built.append(type(self)),
                                                                          original(self, *a, **k))[1])
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path)
    one_line(err, "parameters, over the 1,000,000,000 limit")
    assert built == []


def test_oversized_timm_model_is_sized_on_the_meta_device(tmp_path):
    path = poisoned(tmp_path, "vit_base_patch16_224", {}, depth=200, embed_dim=2048, num_heads=8)
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path)
    one_line(err, "over the 1,000,000,000 limit")


# ---- item 6: NaN and Inf weights are refused at load -------------------------------------------
def honest(tmp_path: Path, model: torch.nn.Module | None = None, name: str = "ok.safetensors") -> Path:
    meta = dict(format="t2t-vit", model="t2t_vit_7", model_kwargs={"img_size": 32, "stem": "small"}, num_classes=10)
    return save_weights(model if model is not None else small(), tmp_path / name, metadata=meta)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys, bad):
    model = small()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[3, 5] = bad
    path = honest(tmp_path, model)
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path)
    one_line(err, "blocks.1.mlp.fc2.weight holds 1 NaN or Inf values")
    assert cli.main(["predict", str(image(tmp_path)), "--checkpoint", str(path), "--json"]) == 2
    out, err_text = capsys.readouterr()
    assert "NaN" not in out and err_text.count("\n") == 1 and "blocks.1.mlp.fc2.weight" in err_text
    authors = tmp_path / "authors.pth.tar"
    authors.write_bytes(authors_file(model))
    with pytest.raises(T2TViTError, match="blocks.1.mlp.fc2.weight holds"):
        timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(authors)), **SMALL)


def test_non_finite_logits_never_reach_the_output(tmp_path):
    """Weights changed after loading (or a precision that overflows): the inference object stops
    with one line instead of returning NaN probabilities."""
    from t2t_vit import inference

    clf = inference.load(checkpoint=honest(tmp_path))
    with torch.no_grad():
        clf.model.head.bias.fill_(float("nan"))
    with pytest.raises(T2TViTError) as err:
        list(clf.classify_files([image(tmp_path)]))
    one_line(err, "NaN or Inf logits")


# ---- item 9: a zip's expanded size is bounded before torch reads it ----------------------------
def deflate_bomb(path: Path, zeros: int) -> Path:
    """A torch zip checkpoint whose one storage record is ``zeros`` DEFLATE-compressed zero bytes
    (torch writes records stored; its reader inflates a compressed one whole)."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(4)}}, buffer)
    source = zipfile.ZipFile(buffer)
    with zipfile.ZipFile(path, "w") as bomb:
        for info in source.infolist():
            if not info.filename.endswith("/data/0"):
                bomb.writestr(info, source.read(info))
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with bomb.open(record, "w", force_zip64=True) as f:
                for _ in range(zeros >> 20):
                    f.write(bytes(1 << 20))
    return path


_PEAK = """
import resource, sys
from t2t_vit.errors import T2TViTError
from t2t_vit.reading import read_state_dict
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_state_dict(sys.argv[1])
except T2TViTError as err:
    print(err)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    """256 MB of zeros in a 0.25 MB file: one line, and the reading process grows by far less than
    the record (it grew by more than the record before the bound)."""
    import subprocess
    import sys

    path = deflate_bomb(tmp_path / "bomb.pth", 256 << 20)
    assert path.stat().st_size < 1 << 20
    env = {**os.environ, "PYTHONPATH": str(Path(t2t_vit.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, env=env,
                            timeout=300, check=True)
    message, grown = result.stdout.strip().splitlines()
    assert "refusing to read" in message and "archive/data/0 expands to 268,435,456 bytes" in message
    assert int(grown) < 128, f"the reader grew by {grown} MB"
    with pytest.raises(T2TViTError, match="past the 1,000-byte limit"):
        check_zip_bounds(path, 1000)
    honest_zip = tmp_path / "ok.pth"
    torch.save({"state_dict": small().state_dict()}, honest_zip)
    assert 0 < check_zip_bounds(honest_zip) <= honest_zip.stat().st_size


# ---- item 11: bytes that are no checkpoint -----------------------------------------------------
@pytest.mark.parametrize("body", GARBAGE, ids=repr)
def test_garbage_bytes_are_one_line(tmp_path, capsys, body):
    path = tmp_path / "x.pth.tar"
    path.write_bytes(body)
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path)
    one_line(err, "not a PyTorch or safetensors checkpoint")
    assert cli.main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "out.safetensors").exists()


# ---- item 10: an img_size far beyond what the model costs to run --------------------------------
def test_img_size_is_bounded_by_what_a_forward_pass_costs(tmp_path, capsys):
    """img_size 4096 on T2T-ViT-t-14 (inside the 4096 px bound) made predicting one 64 px image
    run for minutes: the quadratic attention of 1M first-stage tokens. Refused before building;
    the released 384 px size and the estimate's agreement with the paper's figures stand."""
    from t2t_vit.modelguard import MAX_GMACS, t2t_gmacs
    from t2t_vit.table import VARIANTS

    model = t2t_vit.create_model("t2t_vit_t_14", depth=1, num_classes=10)
    meta = dict(format="t2t-vit", model="t2t_vit_t_14", model_kwargs={"depth": 1}, num_classes=10)
    huge = save_weights(model, tmp_path / "huge.safetensors", metadata={**meta, "img_size": 4096})
    started = time.monotonic()
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(huge)
    one_line(err, "img_size 4096", "GMACs per image, over the 1,000 limit")
    assert time.monotonic() - started < 5
    assert cli.main(["predict", str(image(tmp_path)), "--checkpoint", str(huge)]) == 2
    assert "GMACs per image" in capsys.readouterr().err
    ok = save_weights(model, tmp_path / "ok.safetensors", metadata={**meta, "img_size": 384})
    assert model_from_checkpoint(ok).img_size == (384, 384)
    for name in ("t2t_vit_14", "t2t_vit_t_24", "vit_s16"):  # the estimate follows the paper (within 10 %)
        assert abs(t2t_gmacs(name, {}) - VARIANTS[name].paper.gmacs) < 0.1 * VARIANTS[name].paper.gmacs
    assert t2t_gmacs("t2t_vit_t_14", {"img_size": 1024}) < MAX_GMACS < t2t_gmacs("t2t_vit_t_14", {"img_size": 1536})


# ---- item 12 (library): wrong arguments are one line, not a traceback from deep inside ----------
@pytest.mark.parametrize("kwargs, field", [
    (dict(img_size="abc"), "img_size"), (dict(img_size=True), "img_size"), (dict(img_size=0), "img_size"),
    (dict(img_size=[32]), "img_size"), (dict(img_size=[32, "x"]), "img_size"),
    (dict(stem=[[0, 0, 0]]), "stem"), (dict(stem=[[3, 0, 1]]), "stem"), (dict(stem=[]), "stem"),
    (dict(stem=[[3, 2]]), "stem"), (dict(stem=[[3, 1, 3]]), "stem"), (dict(stem=5), "stem"),
])
def test_bad_model_arguments_are_one_line(kwargs, field):
    with pytest.raises(T2TViTError) as err:
        t2t_vit.create_model("t2t_vit_7", **{"img_size": 32, **kwargs})
    one_line(err, f"{field} must be")


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_c_14", "vit_s16"])
def test_empty_batch_and_wrong_channel_count_are_one_line(name):
    model = t2t_vit.create_model(name, depth=1, num_classes=3, img_size=64).eval()
    with pytest.raises(T2TViTError) as err:
        model(torch.zeros(0, 3, 64, 64))
    one_line(err, "non-empty batch", "(0, 3, 64, 64)")
    with pytest.raises(T2TViTError) as err:
        model(torch.zeros(2, 1, 64, 64))
    one_line(err, "takes 3-channel images", "in_chans=1")
    grey = t2t_vit.create_model(name, depth=1, num_classes=3, img_size=64, in_chans=1).eval()
    assert grey(torch.zeros(2, 1, 64, 64)).shape == (2, 3)


def test_for_inference_takes_precision_names():
    named = t2t_vit.for_inference(small(), "bf16")
    typed = t2t_vit.for_inference(small(), torch.bfloat16)
    assert named.head.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(), typed.state_dict().values()))
    assert t2t_vit.for_inference(small(), "float16").head.weight.dtype == torch.float16
    for bad in ("fp8", torch.int8, 16):
        with pytest.raises(T2TViTError) as err:
            t2t_vit.for_inference(small(), bad)
        one_line(err, "for_inference")


def test_save_pretrained_onto_an_existing_file_is_one_line(tmp_path):
    target = tmp_path / "model"
    target.write_text("keep me")
    with pytest.raises(T2TViTError) as err:
        save_pretrained(small(), target)
    one_line(err, str(target), "is an existing file")
    assert target.read_text() == "keep me"
    with pytest.raises(T2TViTError) as err:
        save_pretrained(small(), target / "inside")
    one_line(err, "could not create")


def test_a_bombed_training_state_is_refused_before_torch_load(tmp_path, monkeypatch):
    """``--resume`` reads ``<stem>.state.pt`` with torch.load too: the same zip bound applies."""
    from safetensors.torch import save_file as safetensors_save

    from t2t_vit.train import state as train_state

    stem = str(tmp_path / "checkpoint-last")
    safetensors_save({"w": torch.zeros(1)}, stem + ".safetensors", metadata={"step": "3"})
    deflate_bomb(Path(stem + ".state.pt"), 256 << 20)
    monkeypatch.setattr(train_state.torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(T2TViTError, match="refusing to read"):
        train_state.load_resume(stem)

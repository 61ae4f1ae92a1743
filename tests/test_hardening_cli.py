"""Issue 23 (second hardening pass), the commands: bad flags are one line, special files are never
opened, figures and exports land where the output line says, with the usual file mode."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import t2t_vit
from t2t_vit.cli import main

TINY_MODEL = ["--model", "t2t_vit_7", "--img-size", "32", "--stem", "small", "--device", "cpu"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-class checkpoint whose class names try to fake terminal output."""
    torch.manual_seed(0)
    model = t2t_vit.create_model("t2t_vit_7", num_classes=3, img_size=32, stem="small").eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    names = ["\x1b[2J\x1b[Hcat", "dog\nt2t-vit: all good", "ship"]
    meta = dict(model="t2t_vit_7", model_kwargs=json.dumps({}), num_classes="3", img_size=json.dumps([32, 32]),
                stem="small", class_names=json.dumps(names))
    save_file(model.state_dict(), str(path), metadata=meta)
    return path


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


# ---- item 12: one line, exit 2, nothing written ----------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["profile", "t2t_vit_7", "--img-size", "100000"], "--img-size must be between 1 and 4096, got 100000"),
    (["eval", "--checkpoint", "CKPT", "--workers", "-1"], "--workers must be at least 0, got -1"),
    (["export", "--checkpoint", "CKPT", "--format", "onnx", "--check-batch", "0", "--output", "OUT/m.onnx"],
     "--check-batch must be between 1 and 4096, got 0"),
    (["visualize", "features", *TINY_MODEL, "--blocks", "a,b", "--output", "OUT/f.png"],
     "--blocks must be comma-separated block numbers"),
    (["visualize", "features", *TINY_MODEL, "--channels", "-3", "--output", "OUT/f.png"],
     "--channels must be between 1 and 64, got -3"),
    (["visualize", "attention", *TINY_MODEL, "--output", "OUT/a.unknownext"],
     "cannot write a figure as"),
    (["predict", "IMG", "--checkpoint", "CKPT", "--topk", "0"], "--topk must be at least 1, got 0"),
    (["predict", "IMG", *TINY_MODEL[:-2], "--img-size", "100000"], "--img-size must be between 1 and 4096"),
])
def test_bad_command_flags_are_one_line(argv, needle, checkpoint, image, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("CKPT", str(checkpoint)).replace("OUT", str(out)).replace("IMG", str(image)) for a in argv]
    assert main(argv) == 2
    assert needle in one_line_error(capsys)
    assert not out.exists()


# ---- item 7: only regular files are opened ----------------------------------------------------------------
def test_predict_and_visualize_never_open_a_fifo(checkpoint, image, tmp_path, capsys):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it would block until a writer comes: forever
    assert main(["predict", str(image), str(fifo), "--checkpoint", str(checkpoint)]) == 1
    captured = capsys.readouterr()
    assert str(image) in captured.out and f"{fifo}" in captured.err and "not a regular file" in captured.err
    assert main(["visualize", "attention", *TINY_MODEL, "--image", str(fifo), "--output", str(tmp_path / "a.png")]) == 2
    assert "not a regular file" in one_line_error(capsys)
    assert not (tmp_path / "a.png").exists()


# ---- item 15: names printed as they are, figures where the line says ----------------------------------------
def test_class_names_are_printed_with_control_characters_escaped(checkpoint, image, capsys):
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--topk", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\x1b[Hcat" in out
    assert "dog\\nt2t-vit: all good" in out and len(out.splitlines()) == 4  # the path + 3 classes


def test_visualize_writes_where_it_says(tmp_path, capsys):
    noext = tmp_path / "noext"
    assert main(["visualize", "attention", *TINY_MODEL, "--output", str(noext)]) == 0
    assert f"wrote {noext}.png " in capsys.readouterr().out and Image.open(f"{noext}.png").format == "PNG"
    folder = tmp_path / "figs"
    folder.mkdir()
    assert main(["visualize", "features", *TINY_MODEL, "--channels", "2", "--output", str(folder)]) == 0
    assert f"wrote {folder / 'features.png'} " in capsys.readouterr().out
    assert Image.open(folder / "features.png").format == "PNG"
    assert not (tmp_path / "figs.png").exists()
    assert sorted(os.listdir(folder)) == ["features.png"]  # written atomically: no temporary left
    svg = tmp_path / "fig.svg"
    assert main(["visualize", "attention", *TINY_MODEL, "--output", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml")  # the suffix names the format


def test_export_keeps_the_link_and_the_usual_file_mode(checkpoint, tmp_path, capsys):
    target = tmp_path / "models" / "model.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "current.pt"
    link.symlink_to(target)
    old_umask = os.umask(0o022)
    try:
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--no-check",
                     "--output", str(link)]) == 0
    finally:
        os.umask(old_umask)
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays a link ...
    assert target.stat().st_size > 1000  # ... and the file it names holds the export
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert sorted(os.listdir(target.parent)) == ["model.pt"]

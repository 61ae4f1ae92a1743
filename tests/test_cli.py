"""The command line as a user meets it: one clear line and exit 2 for bad input, no traceback."""
from __future__ import annotations

import json

import pytest
from PIL import Image

import t2t_vit
from t2t_vit.cli import main
from t2t_vit.storage import save_weights


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "profile", "convert", "bench"):
        assert command in out


def test_unknown_model_suggests_close_match(capsys):
    code, _, err = run_cli(capsys, "profile", "t2t_vit14")
    assert code == 2 and "t2t_vit14" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "train", "--model", "t2t_vit14", "--output", "unused")
    assert code == 2 and "did you mean t2t_vit_14" in err and "Traceback" not in err


def test_checkpoint_of_another_architecture_is_one_line_and_debug_shows_traceback(tmp_path, capsys):
    ckpt = tmp_path / "small.safetensors"
    model = t2t_vit.create_model("t2t_vit_7", img_size=32, stem="small", num_classes=10)
    save_weights(model, ckpt)  # plain weights, as from another tool: the user names the model
    argv = ["eval", "--checkpoint", str(ckpt), "--model", "t2t_vit_t_14", "--img-size", "32", "--workers", "0"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2t-vit: error:") and "width" in lines[0]
    with pytest.raises(Exception) as raised:
        main(argv + ["--debug"])
    assert "width" in str(raised.value)


def _image(path, mode="RGB", size=(40, 40), **save_args):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128 if mode in ("L", "P", "I;16", "1") else (30, 90, 200)[: len(mode)]).save(path, **save_args)
    return path


@pytest.mark.e2e
def test_training_on_a_messy_folder_skips_bad_files_and_completes(tmp_path, capsys, caplog):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for label in ("a", "b"):
            for i in range(4):
                _image(root / split / label / f"{i}.png")
    _image(root / "train" / "a" / "gray.jpg", "L")
    _image(root / "train" / "a" / "cmyk.jpg", "CMYK")
    _image(root / "train" / "b" / "palette.png", "P")
    _image(root / "train" / "b" / "deep.png", "I;16")
    good_jpg = _image(root / "train" / "b" / "cut.jpg", quality=95).read_bytes()
    (root / "train" / "b" / "cut.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    (root / "train" / "a" / "notes.jpg").write_text("not an image")
    _image(root / "train" / "a" / "bomb.png", "1", size=(20_000, 20_000))
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "train", "--data", str(root), "--model", "t2t_vit_7", "--img-size", "32", "--stem", "small",
        "--model-kwargs", "{embed_dim: 32, depth: 1, num_heads: 2, token_dim: 16}", "--epochs", "1",
        "--batch-size", "4", "--no-augment", "--workers", "0", "--output", str(out),
    )
    assert code == 0, err
    text = stdout + err + caplog.text  # the per-file warnings go through logging
    for bad in ("cut.jpg", "notes.jpg", "bomb.png"):
        assert text.count(bad) == 1, (bad, text)
    for odd in ("gray.jpg", "cmyk.jpg", "palette.png", "deep.png"):  # converted to RGB and used
        assert odd not in text
    assert "skipped 3 unusable file(s)" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_files"] == 3 and metrics["steps"] == 3  # 12 usable train images / batch 4


def test_optional_dependencies_live_in_extras():
    """Every package a command names in its install hint is installed by that extra, not by default."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() for req in requirements}

    extras = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    for package, extra in [("onnx", "export"), ("onnxscript", "export"), ("onnxruntime", "export"),
                           ("tensorboard", "tensorboard")]:
        assert package in extras[extra] and package not in names(project["dependencies"]), (package, extra)


def test_debug_anywhere_on_the_line_raises_with_the_cause(tmp_path, capsys):
    argv = ["predict", str(tmp_path / "missing.png"), "--checkpoint", str(tmp_path / "none.safetensors")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err
    with pytest.raises(t2t_vit.T2TViTError, match="does not exist"):
        main(argv + ["--debug"])

"""predict: checkpoint metadata → model, class names, top-k, unreadable images."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import t2t_vit
from t2t_vit import predict
from t2t_vit.errors import T2TViTError

torch.set_num_threads(1)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    predict.register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = t2t_vit.create_model("t2t_vit_7", num_classes=3, img_size=32, stem="small").eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    meta = dict(model="t2t_vit_7", model_kwargs=json.dumps({}), num_classes="3", img_size=json.dumps([32, 32]),
                stem="small", class_names=json.dumps(["cat", "dog", "ship"]))
    save_file(model.state_dict(), str(path), metadata=meta)
    return model, path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import skimage.data

    folder = tmp_path_factory.mktemp("img")
    paths = []
    for name in ("chelsea", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).resize((48, 40)).save(path)
        paths.append(path)
    bad = folder / "broken.jpg"
    bad.write_bytes(b"not an image")
    return paths, bad


def test_load_model_follows_metadata_and_weights(small_checkpoint):
    reference, path = small_checkpoint
    model, meta = predict.load_model(None, path)
    assert (model.num_classes, model.img_size, meta["class_names"]) == (3, (32, 32), ["cat", "dog", "ship"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    with pytest.raises(T2TViTError, match="holds a 't2t_vit_7'"):
        predict.load_model("t2t_vit_14", path)


def test_class_names():
    assert predict.class_names(2, {"class_names": ["a", "b"]}) == ["a", "b"]
    assert predict.class_names(3) == ["class_0", "class_1", "class_2"]
    names = predict.class_names(1000)
    assert names[281].startswith("tabby") and len(set(names)) > 990


def test_predict_json_matches_manual_softmax(small_checkpoint, images, capsys):
    reference, path = small_checkpoint
    paths, bad = images
    code = run_cli("predict", str(paths[0]), str(bad), str(paths[1]), "--checkpoint", str(path), "--topk", "2",
                   "--json", "--device", "cpu")
    out, err = capsys.readouterr()
    assert code == 1  # one image failed, the others were predicted
    assert err.strip().count("\n") == 0 and "broken.jpg" in err and "not an image" in err
    records = json.loads(out)
    assert [r["image"] for r in records] == [str(paths[0]), str(paths[1]), str(bad)] and "error" in records[2]
    # Independent reference: resize shorter side to 32/0.9, centre crop 32, ImageNet normalisation.
    image = Image.open(paths[0]).convert("RGB")
    short = int(32 / 0.9)
    image = image.resize((int(round(short * 48 / 40)), short), Image.BICUBIC)
    left, top = (image.width - 32) // 2, (image.height - 32) // 2
    array = np.asarray(image.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
    x = (torch.from_numpy(array).permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        probs = reference(x[None]).softmax(-1)[0]
    top = records[0]["predictions"]
    assert [p["index"] for p in top] == probs.argsort(descending=True)[:2].tolist()
    assert top[0]["label"] == ["cat", "dog", "ship"][top[0]["index"]]
    assert top[0]["probability"] == pytest.approx(probs.max().item(), abs=2e-2)


def test_predict_text_output_and_all_unreadable(small_checkpoint, images, capsys):
    _, path = small_checkpoint
    paths, bad = images
    assert run_cli("predict", str(paths[0]), "--checkpoint", str(path), "--topk", "9", "--device", "cpu") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(paths[0]) and len(lines) == 4  # topk clipped to the 3 classes
    probs = [float(line.split("%")[0].split(".", 1)[1]) for line in lines[1:]]
    assert sum(probs) == pytest.approx(100, abs=0.05) and probs == sorted(probs, reverse=True)
    with pytest.raises(T2TViTError, match="none of the images"):
        run_cli("predict", str(bad), "--checkpoint", str(path), "--device", "cpu")


def test_predict_in_bf16_runs_under_autocast_and_agrees(small_checkpoint, images, monkeypatch):
    model, _ = small_checkpoint
    pictures = [Image.open(p).convert("RGB") for p in images[0]]
    seen = []
    hook = model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        fp32 = predict.predict(model, pictures, ["cat", "dog", "ship"], topk=3)
        bf16 = predict.predict(model, pictures, ["cat", "dog", "ship"], topk=3, precision="bf16")
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    for a, b in zip(fp32, bf16):
        assert sum(p for *_, p in b) == pytest.approx(1.0, abs=1e-5)  # softmax in fp32 over all 3 classes
        assert [p for *_, p in a] == pytest.approx([p for *_, p in b], abs=0.02)

"""predict and t2t_vit.inference: checkpoint metadata → model, preprocessing, class names, top-k,
unreadable images, the training loader's decoding, pretrained tags and the authors' files."""
from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import t2t_vit
from t2t_vit import inference, predict
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


def test_load_follows_metadata_and_weights(small_checkpoint):
    reference, path = small_checkpoint
    clf = inference.load(checkpoint=path, device="cpu")
    model, meta = clf.model, clf.meta
    assert (model.num_classes, model.img_size, meta["class_names"]) == (3, (32, 32), ["cat", "dog", "ship"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    with pytest.raises(T2TViTError, match="holds a 't2t_vit_7'"):
        inference.load(checkpoint=path, model="t2t_vit_14", device="cpu")


def test_class_names():
    assert inference.class_names(2, {"class_names": ["a", "b"]}) == ["a", "b"]
    assert inference.class_names(3) == ["class_0", "class_1", "class_2"]
    assert inference.class_names(2, {"class_names": 5}) == ["class_0", "class_1"]  # malformed metadata ignored
    names = inference.class_names(1000)
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


def test_predict_a_folder_classifies_the_images_inside(small_checkpoint, images, tmp_path, capsys):
    _, path = small_checkpoint
    paths, _ = images
    nested = tmp_path / "photos" / "more"
    nested.mkdir(parents=True)
    first, second = tmp_path / "photos" / "b.png", nested / "a.png"
    first.write_bytes(paths[0].read_bytes())
    second.write_bytes(paths[1].read_bytes())
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / ".hidden.png").write_bytes(paths[0].read_bytes())
    assert run_cli("predict", str(tmp_path / "photos"), "--checkpoint", str(path), "--json", "--device", "cpu") == 0
    assert [r["image"] for r in json.loads(capsys.readouterr().out)] == [str(first), str(second)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(T2TViTError, match="no image files in"):
        run_cli("predict", str(tmp_path / "empty"), "--checkpoint", str(path), "--device", "cpu")


def test_inference_is_an_attribute_of_the_package():
    import subprocess
    import sys

    code = "import t2t_vit; print(t2t_vit.inference.load.__name__, t2t_vit.dense.FPNBackbone.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["load", "FPNBackbone"]


def test_predict_in_bf16_runs_under_autocast_and_agrees(small_checkpoint, images, monkeypatch):
    model = copy.deepcopy(small_checkpoint[0])  # a low precision may convert the model it is given
    pictures = [Image.open(p).convert("RGB") for p in images[0]]
    seen = []
    hook = model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        fp32 = inference.predict(model, pictures, ["cat", "dog", "ship"], topk=3)
        bf16 = inference.predict(model, pictures, ["cat", "dog", "ship"], topk=3, precision="bf16")
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    for a, b in zip(fp32, bf16):
        assert sum(p for *_, p in b) == pytest.approx(1.0, abs=1e-5)  # softmax in fp32 over all 3 classes
        assert [p for *_, p in a] == pytest.approx([p for *_, p in b], abs=0.02)


# ---- preprocessing follows the checkpoint ------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits-demo-shaped checkpoint that stores its data config, and held-out digits as PNGs."""
    from t2t_vit.data import create_datasets
    from t2t_vit.storage import save_weights

    bundle = create_datasets("digits", 32, augment=None)
    folder = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    model = t2t_vit.create_model("t2t_vit_7", num_classes=10, img_size=32, stem="small", embed_dim=64, depth=2,
                                 num_heads=2, token_dim=16).eval()
    config = {"input_size": [3, 32, 32], "mean": list(bundle.mean), "std": list(bundle.std),
              "crop_pct": bundle.crop_pct, "interpolation": "bicubic"}
    meta = dict(model="t2t_vit_7", num_classes=10, img_size=[32, 32], stem="small",
                model_kwargs=dict(embed_dim=64, depth=2, num_heads=2, token_dim=16),
                class_names=bundle.class_names)
    with_config = save_weights(model, folder / "with.safetensors", metadata=dict(meta, data_config=config))
    without = save_weights(model, folder / "without.safetensors", metadata=meta)
    paths = []
    for i in range(12):
        path = folder / f"{i}.png"
        Image.fromarray(bundle.val.images[i]).save(path)
        paths.append(path)
    return bundle, with_config, without, paths


def test_predict_preprocesses_as_evaluation_did(digits_run):
    """The checkpoint's mean/std/crop make predict's input the very tensor eval fed the model."""
    bundle, with_config, without, paths = digits_run
    clf = inference.load(checkpoint=with_config, device="cpu")
    assert clf.config["mean"] == pytest.approx(bundle.mean) and clf.config["crop_pct"] == 1.0
    eval_batch = torch.stack([bundle.val[i][0] for i in range(len(paths))])
    predict_batch = clf.tensor([inference.read_image(p) for p in paths])
    torch.testing.assert_close(predict_batch, eval_batch, rtol=0, atol=1e-6)
    # Without a stored data config the fallback is timm's (ImageNet statistics, crop 0.9): not the same input.
    fallback = inference.load(checkpoint=without, device="cpu")
    assert fallback.config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert (fallback.tensor([inference.read_image(paths[0])])[0] - eval_batch[0]).abs().max() > 0.5


def test_predict_cli_agrees_with_eval_on_saved_digits(digits_run, capsys):
    bundle, with_config, _, paths = digits_run
    clf = inference.load(checkpoint=with_config, device="cpu")
    expected = clf.logits(torch.stack([bundle.val[i][0] for i in range(len(paths))])).argmax(-1).tolist()
    assert run_cli("predict", *map(str, paths), "--checkpoint", str(with_config), "--json", "--topk", "1") == 0
    got = [int(r["predictions"][0]["label"]) for r in json.loads(capsys.readouterr().out)]
    assert got == expected


@pytest.mark.parametrize("bad", [{"mean": "grey"}, {"std": [0.2, 0.0, 0.2]}, {"crop_pct": 2.5},
                                 {"interpolation": "cubic"}, "not json", [1, 2]])
def test_malformed_data_config_is_one_clear_error(digits_run, tmp_path, bad):
    from t2t_vit.reading import read_metadata, read_state_dict
    from t2t_vit.storage import encode_metadata

    _, with_config, _, _ = digits_run
    meta = read_metadata(with_config)
    meta["data_config"] = bad if isinstance(bad, str) else json.dumps(bad)
    path = tmp_path / "bad.safetensors"
    save_file(read_state_dict(with_config), str(path), metadata=encode_metadata(meta))
    with pytest.raises(T2TViTError, match="data_config"):
        inference.load(checkpoint=path, device="cpu")


# ---- one image reader with the training loader --------------------------------------------------
def test_sixteen_bit_png_decodes_as_in_training(small_checkpoint, tmp_path):
    from t2t_vit.data.folder import load_image

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((40, 48), 32768, dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    image = inference.read_image(deep)
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (128, 128, 128) == load_image(str(deep)).getpixel((5, 5))
    grey = tmp_path / "grey.png"
    Image.new("RGB", (48, 40), (128, 128, 128)).save(grey)
    clf = inference.load(checkpoint=small_checkpoint[1], device="cpu")
    torch.testing.assert_close(clf.logits(clf.tensor([image])), clf.logits(clf.tensor([Image.open(grey)])))


def test_exif_orientation_is_applied(small_checkpoint, tmp_path):
    raw = np.zeros((20, 40, 3), dtype=np.uint8)
    raw[:, :10] = (255, 0, 0)  # red band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90° clockwise
    tagged = tmp_path / "tagged.png"
    Image.fromarray(raw).save(tagged, exif=exif)
    image = inference.read_image(tagged)
    assert image.size == (20, 40)  # (width, height): portrait once upright
    top, bottom = np.asarray(image)[2, 10], np.asarray(image)[-3, 10]
    assert top[0] > 200 and top[1] < 60 and bottom[0] < 60  # the left band is now at the top
    upright = tmp_path / "upright.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(raw, k=-1))).save(upright)  # turned clockwise, no tag
    clf = inference.load(checkpoint=small_checkpoint[1], device="cpu")
    torch.testing.assert_close(clf.logits(clf.tensor([image])), clf.logits(clf.tensor([Image.open(upright)])))


def test_decompression_bomb_among_good_images_is_skipped_and_named_once(small_checkpoint, images, tmp_path, capsys):
    _, path = small_checkpoint
    paths, _ = images
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 9_000)).save(bomb)  # 90M pixels: past the loader's limit, a few kB on disk
    code = run_cli("predict", str(paths[0]), str(bomb), str(paths[1]), "--checkpoint", str(path), "--topk", "1")
    out, err = capsys.readouterr()
    assert code == 1
    assert err.count("bomb.png") == 1 and "too large" in err and out.count("bomb.png") == 0
    assert str(paths[0]) in out and str(paths[1]) in out


# ---- where the weights come from ----------------------------------------------------------------
def test_pretrained_tag_goes_to_create_model(monkeypatch, images, capsys):
    calls = []

    def fake_create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        model = t2t_vit.T2TViT(num_classes=2, img_size=32, stem="small", embed_dim=32, depth=1, num_heads=2,
                               token_dim=16)
        model.pretrained_cfg = dict(architecture="t2t_vit_7", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                    crop_pct=1.0, interpolation="bilinear", label_names=["yes", "no"])
        return model

    monkeypatch.setattr(t2t_vit, "create_model", fake_create_model)
    assert run_cli("predict", "--model", "t2t_vit_7.fake_tag", "--pretrained", str(images[0][0]), "--device",
                   "cpu") == 0
    assert calls == [("t2t_vit_7.fake_tag", True, {})]
    out = capsys.readouterr().out
    assert "yes" in out and "no" in out  # the tag's label names
    clf = inference.load(model="t2t_vit_7.fake_tag", pretrained=True, device="cpu")
    assert (clf.config["mean"], clf.config["crop_pct"], clf.config["interpolation"]) == ((0.5,) * 3, 1.0, "bilinear")
    with pytest.raises(T2TViTError, match="give one of them"):
        inference.load(checkpoint=__file__, model="t2t_vit_7.fake_tag", pretrained=True)


def test_authors_file_names_its_model(images, tmp_path, capsys):
    torch.manual_seed(0)
    model = t2t_vit.create_model("t2t_vit_7").eval()
    state = {k: v for k, v in model.state_dict().items()}
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    args = argparse.Namespace(model="T2t_vit_7", img_size=224, num_classes=1000)
    torch.save({"epoch": 300, "arch": "T2t_vit_7", "state_dict": state, "state_dict_ema": state, "args": args},
               path)
    assert run_cli("predict", str(images[0][0]), "--checkpoint", str(path), "--device", "cpu", "--topk", "1") == 0
    assert str(images[0][0]) in capsys.readouterr().out


def test_no_model_and_no_checkpoint_is_one_clear_error():
    with pytest.raises(T2TViTError, match="--model NAME"):
        inference.load()
    with pytest.raises(T2TViTError, match="does not exist"):
        inference.load(checkpoint="/nonexistent/model.safetensors")


def test_batched_and_precision_names():
    assert list(inference.batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(T2TViTError, match="at least 1"):
        list(inference.batched([1], 0))
    with pytest.raises(T2TViTError, match="unknown precision"):
        inference.with_precision(torch.nn.Linear(1, 1), "fp8")


def test_weights_option_picks_the_ema_copy(small_checkpoint, images, tmp_path, capsys):
    from t2t_vit.storage import save_weights

    model, path = small_checkpoint
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))  # the EMA copy always says "ship"
    both = save_weights(model, tmp_path / "both.safetensors", ema=ema,
                        metadata=dict(model="t2t_vit_7", num_classes=3, img_size=[32, 32], stem="small",
                                      class_names=["cat", "dog", "ship"], preferred="model"))
    picked = {}
    for weights in ("preferred", "ema", "model"):
        assert run_cli("predict", str(images[0][0]), "--checkpoint", str(both), "--weights", weights, "--json",
                       "--topk", "1", "--device", "cpu") == 0
        picked[weights] = json.loads(capsys.readouterr().out)[0]["predictions"][0]
    assert picked["ema"]["label"] == "ship" and picked["ema"]["probability"] > 0.99
    assert picked["preferred"] == picked["model"] != picked["ema"]


@pytest.mark.parametrize("named", ["hf-hub:evil/model", "local-dir:/tmp", 5])
def test_metadata_never_selects_a_remote_source(small_checkpoint, tmp_path, monkeypatch, named):
    import socket

    from t2t_vit.reading import read_state_dict

    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: lookups.append(a) or [])
    path = tmp_path / "evil.safetensors"
    save_file(read_state_dict(small_checkpoint[1]), str(path),
              metadata=dict(model=named if isinstance(named, str) else json.dumps(named), num_classes="3",
                            img_size="[32, 32]", stem="small"))
    with pytest.raises(T2TViTError, match="model"):
        inference.load(checkpoint=path, device="cpu")
    assert lookups == []


def test_low_precision_converts_the_model_once_without_autocast(small_checkpoint, images):
    """``--precision bf16`` goes through ``t2t_vit.for_inference``: the model is converted once
    and fed inputs of its dtype, with no autocast around the forward."""
    seen = []

    def record(module, args, out):
        seen.append((args[0].dtype, torch.is_autocast_enabled("cpu")))

    model = copy.deepcopy(small_checkpoint[0])
    model.head.register_forward_hook(record)
    pictures = [Image.open(p).convert("RGB") for p in images[0]]
    clf = inference.Inference(model, inference.data_config(model), ["cat", "dog", "ship"], precision="bf16")
    top = clf.classify(pictures, topk=3, batch_size=1)
    assert clf.input_dtype == torch.bfloat16
    assert seen == [(torch.bfloat16, False)] * 2 and clf.model.head.weight.dtype == torch.bfloat16
    assert sum(p for *_, p in top[0]) == pytest.approx(1.0, abs=1e-3)

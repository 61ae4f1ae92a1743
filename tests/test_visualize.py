"""visualize: feature maps and attention against step-by-step references; PNGs are real images."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import t2t_vit
from t2t_vit import visualize
from t2t_vit.errors import T2TViTError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return t2t_vit.create_model("t2t_vit_t_14", num_classes=5, img_size=32, stem="small", depth=3).eval()


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    visualize.register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)



def assert_real_png(path, size):
    image = Image.open(path)
    assert image.format == "PNG" and image.size == size
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 20, "image looks blank"


def test_feature_maps_match_manual_reshape(model):
    x = torch.randn(1, 3, 32, 32)
    maps = visualize.feature_maps(model, x, [1, 3])
    assert [label for label, _ in maps] == ["T2T layer 1", "T2T layer 2", "block 1", "block 3"]
    assert [tuple(m.shape) for _, m in maps] == [(64, 32, 32), (64, 16, 16), (384, 8, 8), (384, 8, 8)]
    with torch.no_grad():
        t2t = model.tokens_to_token
        first = t2t.attention1(t2t.soft_split0(x))  # (1, 1024, 64), row-major over the 32x32 grid
        tokens = model.embed(x)
        for block in model.blocks:
            tokens = block(tokens)
    torch.testing.assert_close(maps[0][1][:, 2, 5], first[0, 2 * 32 + 5])
    torch.testing.assert_close(maps[3][1][:, 6, 1], tokens[0, 1 + 6 * 8 + 1])
    with pytest.raises(T2TViTError, match="between 1 and 3"):
        visualize.feature_maps(model, x, [4])


def test_attention_hooks_match_reference(model):
    x = torch.randn(2, 3, 32, 32)
    attentions, logits = visualize.attention_maps(model, x)
    reference = []
    with torch.no_grad():
        tokens = model.embed(x)
        for block in model.blocks:
            q, k, _ = block.attn.qkv(block.norm1(tokens)).reshape(2, 65, 3, 6, 64).permute(2, 0, 3, 1, 4)
            reference.append(torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1))
            tokens = block(tokens)
        torch.testing.assert_close(logits, model(x))
    assert len(attentions) == 3
    for got, want in zip(attentions, reference):
        torch.testing.assert_close(got, want)
    # Rollout by explicit loop over numpy matrices.
    roll = np.eye(65)
    for a in reference:
        m = 0.5 * a[0].mean(0).numpy() + 0.5 * np.eye(65)
        roll = (m / m.sum(-1, keepdims=True)) @ roll
    np.testing.assert_allclose(visualize.attention_rollout(attentions)[0].numpy(), roll, atol=1e-5)
    last, rolled, _ = visualize.cls_attention(model, x)
    assert last.shape == rolled.shape == (8, 8)
    np.testing.assert_allclose(rolled.flatten().numpy(), roll[0, 1:], atol=1e-5)


@pytest.mark.e2e
def test_cli_writes_labelled_pngs(tmp_path, capsys):
    features = tmp_path / "features.png"
    common = ["--model", "t2t_vit_7", "--img-size", "32", "--stem", "small", "--device", "cpu"]
    assert run_cli("visualize", "features", *common, "--output", str(features), "--blocks", "1,7", "--channels", "4") == 0
    assert_real_png(features, (560, 490))  # figsize (1.0·cols + 0.6, 1.05·rows + 0.7) in at 100 dpi
    attention = tmp_path / "attention.png"
    assert run_cli("visualize", "attention", *common, "--sample", "astronaut", "--output", str(attention)) == 0
    assert_real_png(attention, (1080, 390))
    assert "wrote" in capsys.readouterr().out


def test_prepare_uses_the_checkpoints_statistics(model, tmp_path):
    """The plotted input is normalised with the run's mean/std and shown back as the plain crop."""
    from t2t_vit import inference
    from t2t_vit.storage import save_weights

    config = {"mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2], "crop_pct": 1.0, "interpolation": "bilinear"}
    meta = dict(model="t2t_vit_t_14", num_classes=5, img_size=[32, 32], stem="small", model_kwargs={"depth": 3},
                data_config=config)
    path = save_weights(model, tmp_path / "m.safetensors", metadata=meta)
    clf = inference.load(checkpoint=path, device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    x, shown = visualize.prepare(clf, image)
    plain = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(x[0], (plain - 0.3) / 0.2)
    np.testing.assert_allclose(shown, np.asarray(image, dtype=np.float32) / 255, atol=1e-5)


def test_matplotlib_is_set_up_in_one_place():
    import inspect

    source = inspect.getsource(visualize)
    assert "import matplotlib" not in source
    assert visualize.pyplot.__module__ == "t2t_vit.plotting"

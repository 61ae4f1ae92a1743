"""Released weights as timm pretrained tags, served from a web server on 127.0.0.1 in this process.

Each served file is in the authors' layout (``state_dict_ema``/``state_dict`` with ``module.``
keys and an ``argparse.Namespace`` under ``args``; the CIFAR fine-tunes under ``net``), built
from one of our randomly initialised models, so a load that takes the wrong copy, skips a
tensor or adapts wrongly changes the logits. The torch cache lives in ``tmp_path``.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.server
import inspect
import io
import threading
from pathlib import Path

import pytest
import timm
import torch
from timm.models import _registry

import t2t_vit
from t2t_vit import variants
from t2t_vit.errors import T2TViTError
from t2t_vit.hub import cache_dir

SMALL = dict(img_size=32, stem="small")  # keeps every tag's model quick: the blocks are the same


class Server:
    """Serves ``files`` (name → bytes); ``modes[name]`` = "truncate" closes the connection halfway
    after announcing the full length; a name not in ``files`` is a 404. Counts requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append(name)
                body = outer.files.get(name)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.modes.get(name) == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/releases/download/main/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with Server() as srv:
        yield srv


def serve_tag(monkeypatch, server: Server, tag: str, body: bytes, url: str | None = None) -> str:
    """Point ``tag``'s cfg at the loopback server and publish ``body`` under the authors' file name."""
    release = variants.RELEASES[tag]
    cfg = _registry._model_pretrained_cfgs[tag]
    monkeypatch.setitem(_registry._model_pretrained_cfgs, tag,
                        dataclasses.replace(cfg, url=(url or server.url) + release.file))
    server.files[release.file] = body
    return release.file


def authors_bytes(ema: torch.nn.Module, plain: torch.nn.Module | None, cifar: bool = False,
                  extra: dict | None = None) -> bytes:
    """A released file's bytes: ``plain=None`` leaves out the non-EMA copy (the released files
    hold one copy: 81.5_T2T_ViT_14.pth.tar is 4 bytes per parameter of T2T-ViT-14)."""
    prefix = lambda m: {"module." + k: v.clone() for k, v in {**m.state_dict(), **(extra or {})}.items()}  # noqa: E731
    if cifar:
        obj = {"net": prefix(ema), "acc": 98.3, "epoch": 59}
    else:
        obj = {"state_dict_ema": prefix(ema), "epoch": 309, "arch": "T2t_vit_7", "metric": 71.7,
               "args": argparse.Namespace(model="T2t_vit_7", img_size=224)}
        if plain is not None:
            obj["state_dict"] = prefix(plain)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pair(tag: str, seed: int = 0, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(EMA-like, plain) models of the tag's architecture that differ in every tensor."""
    torch.manual_seed(seed)
    ema = timm.create_model(tag, **SMALL, **kwargs).eval()
    plain = timm.create_model(tag, **SMALL, **kwargs).eval()
    return ema, plain


def logits(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.eval()(x)


# ---- every released checkpoint, through timm -----------------------------------------------
@pytest.mark.parametrize("tag", sorted(variants.RELEASES))
def test_every_tag_loads_through_loopback(monkeypatch, server, tag):
    release = variants.RELEASES[tag]
    extra = {}
    if tag.endswith("tl_in1k") and "token_label_head" not in inspect.signature(t2t_vit.T2TViT).parameters:
        pytest.skip("T2TViT has no token_label_head argument yet")
    torch.manual_seed(len(tag))
    ema = timm.create_model(tag, **SMALL).eval()
    monkeypatch.setitem(variants.RELEASES, tag, dataclasses.replace(release, size=None, digest=None))  # not the real file
    serve_tag(monkeypatch, server, tag, authors_bytes(ema, None, cifar="cifar" in tag, extra=extra))
    loaded = timm.create_model(tag, pretrained=True, **SMALL)
    assert loaded.num_classes == release.num_classes
    assert loaded.pretrained_cfg["url"].endswith(release.file) and f"{release.top1}" in loaded.pretrained_cfg["notes"][0]
    torch.testing.assert_close(logits(loaded), logits(ema), rtol=0, atol=0)  # the EMA copy, exactly
    assert (cache_dir() / release.file).is_file() and server.requests == [release.file]


def test_tag_cfgs_say_how_the_authors_evaluated():
    cfg = timm.models.get_pretrained_cfg("t2t_vit_14.in1k_384").to_dict()
    assert cfg["input_size"] == (3, 384, 384) and cfg["num_classes"] == 1000
    cifar = timm.models.get_pretrained_cfg("t2t_vit_19.in1k_ft_cifar100").to_dict()
    assert cifar["num_classes"] == 100 and cifar["crop_pct"] == 1.0 and cifar["mean"] == variants.CIFAR_MEAN
    assert cifar["url"] == variants.RELEASE_URL + "cifar100_t2t-vit-19_89.0.pth"
    assert variants.RELEASES["t2t_vit_14.in1k"].size == 86_212_823
    assert timm.create_model("t2t_vit_14.in1k_384").img_size == (384, 384)


# ---- cache, offline use ------------------------------------------------------------------------
def test_download_once_then_offline(monkeypatch, server, tmp_path):
    ema, plain = pair("t2t_vit_7.in1k", seed=1)
    file = serve_tag(monkeypatch, server, "t2t_vit_7.in1k", authors_bytes(ema, plain))
    first = t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, **SMALL)
    second = timm.create_model("t2t_vit_7", pretrained=True, **SMALL)  # the default tag, from the cache
    assert server.requests == [file]
    assert Path(tmp_path / "torch" / "hub" / "checkpoints" / file).is_file()
    # offline: the cfg's URL now points at a closed port, and the cached copy is used
    serve_tag(monkeypatch, server, "t2t_vit_7.in1k", b"", url="http://127.0.0.1:9/")
    third = t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, **SMALL)
    for model in (first, second, third):
        torch.testing.assert_close(logits(model), logits(ema), rtol=0, atol=0)
    # a local file never touches the network: checkpoint_path=, pretrained_cfg_overlay=dict(file=)
    local = tmp_path / "local.pth.tar"
    local.write_bytes(authors_bytes(plain, ema))
    for model in (t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, checkpoint_path=str(local), **SMALL),
                  timm.create_model("t2t_vit_7.in1k", pretrained=True, **SMALL,
                                    pretrained_cfg_overlay=dict(file=str(local)))):
        torch.testing.assert_close(logits(model), logits(plain), rtol=0, atol=0)
    assert server.requests == [file]
    # timm's cache_dir= replaces the cache folder
    serve_tag(monkeypatch, server, "t2t_vit_7.in1k", authors_bytes(ema, plain))
    elsewhere = tmp_path / "elsewhere"
    moved = timm.create_model("t2t_vit_7.in1k", pretrained=True, cache_dir=str(elsewhere), **SMALL)
    assert (elsewhere / file).is_file() and server.requests == [file, file]
    torch.testing.assert_close(logits(moved), logits(ema), rtol=0, atol=0)


def test_new_class_count_and_size_keep_the_body(monkeypatch, server):
    ema, plain = pair("t2t_vit_7.in1k", seed=2)
    serve_tag(monkeypatch, server, "t2t_vit_7.in1k", authors_bytes(ema, plain))
    five = t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, num_classes=5, **SMALL)
    assert five.head.out_features == 5
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(five.eval().forward_head(five.forward_features(x), pre_logits=True),
                               ema.forward_head(ema.forward_features(x), pre_logits=True))
    bigger = t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, img_size=48, stem="small")
    assert bigger.img_size == (48, 48) and logits(bigger, 48).shape == (2, 1000)


# ---- failures: one line naming the URL, nothing left in the cache ---------------------------
def _one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(err.value)
    assert "\n" not in text and all(p in text for p in parts), text


def test_404_and_unreachable(monkeypatch, server):
    tag = "t2t_vit_10.in1k"
    serve_tag(monkeypatch, server, tag, b"")
    server.files.clear()
    with pytest.raises(T2TViTError) as err:
        timm.create_model(tag, pretrained=True, **SMALL)
    _one_line(err, server.url + variants.RELEASES[tag].file, "HTTP 404")
    serve_tag(monkeypatch, server, tag, b"", url="http://127.0.0.1:9/")
    with pytest.raises(T2TViTError) as err:
        t2t_vit.create_model(tag, pretrained=True, **SMALL)
    _one_line(err, "http://127.0.0.1:9/", "could not download", "--checkpoint FILE", "checkpoint_path=")
    assert not cache_dir().exists() or not any(cache_dir().iterdir())


def test_truncated_download_leaves_nothing_and_the_next_try_works(monkeypatch, server):
    tag = "t2t_vit_7.in1k"
    ema, plain = pair(tag, seed=4)
    file = serve_tag(monkeypatch, server, tag, authors_bytes(ema, plain))
    server.modes[file] = "truncate"
    with pytest.raises(T2TViTError) as err:
        timm.create_model(tag, pretrained=True, **SMALL)
    _one_line(err, server.url + file, "truncated")
    assert list(cache_dir().iterdir()) == []  # no partial file, no final name
    server.modes.clear()
    torch.testing.assert_close(logits(timm.create_model(tag, pretrained=True, **SMALL)), logits(ema), rtol=0, atol=0)


def test_truncated_file_on_the_server_is_removed_from_the_cache(monkeypatch, server):
    tag = "t2t_vit_7.in1k"
    ema, plain = pair(tag, seed=5)
    body = authors_bytes(ema, plain)
    file = serve_tag(monkeypatch, server, tag, body[: len(body) // 3])  # consistent length, broken content
    with pytest.raises(T2TViTError) as err:
        t2t_vit.create_model(tag, pretrained=True, **SMALL)
    _one_line(err, server.url + file, "not a readable checkpoint", "nothing was cached")  # read before it enters the cache
    assert not (cache_dir() / file).exists()
    server.files[file] = body
    torch.testing.assert_close(logits(t2t_vit.create_model(tag, pretrained=True, **SMALL)), logits(ema), rtol=0, atol=0)


def test_published_size_is_checked(monkeypatch, server):
    tag = "t2t_vit_7.in1k"
    ema, plain = pair(tag, seed=6)
    body = authors_bytes(ema, plain)
    monkeypatch.setitem(variants.RELEASES, tag, dataclasses.replace(variants.RELEASES[tag], size=len(body) + 1))
    file = serve_tag(monkeypatch, server, tag, body)
    with pytest.raises(T2TViTError) as err:
        timm.create_model(tag, pretrained=True, **SMALL)
    _one_line(err, server.url + file, f"got {len(body)} bytes", f"has {len(body) + 1}")
    assert list(cache_dir().iterdir()) == []


def test_pickled_code_in_a_download_is_refused(monkeypatch, server, tmp_path):
    tag = "t2t_vit_7.in1k"
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"state_dict": pair(tag)[0].state_dict(), "args": _Payload(str(marker))}, buffer)
    file = serve_tag(monkeypatch, server, tag, buffer.getvalue())
    with pytest.raises(T2TViTError, match="could run code") as err:
        timm.create_model(tag, pretrained=True, **SMALL)
    assert "argparse.Namespace are accepted" in str(err.value) and "argparse.Namespace," not in str(err.value)
    assert not marker.exists() and not (cache_dir() / file).exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("key", ["mystery.weight", "aux_head.weight"])
def test_unknown_keys_are_named(monkeypatch, server, key):
    """Any key the model does not have is a one-line error naming it; an auxiliary Token Labeling
    head is only accepted by a model built with one (the tl_in1k tag)."""
    tag = "t2t_vit_7.in1k"
    ema = pair(tag, seed=7)[0]
    serve_tag(monkeypatch, server, tag, authors_bytes(ema, None, extra={key: torch.zeros(1000, 256)}))
    with pytest.raises(T2TViTError) as err:
        timm.create_model(tag, pretrained=True, **SMALL)
    _one_line(err, "1 unexpected keys", key)


def test_untagged_variant_has_no_weights_to_download():
    with pytest.raises(T2TViTError, match="no released weights for vit_s16"):
        t2t_vit.create_model("vit_s16", pretrained=True)
    with pytest.raises(T2TViTError, match="unknown pretrained tag 't2t_vit_7.in22k'; t2t_vit_7 has: t2t_vit_7.in1k"):
        t2t_vit.create_model("t2t_vit_7.in22k")


@pytest.mark.parametrize("name", t2t_vit.list_models())
def test_first_conv_names_the_first_layer_reading_the_image(name):
    model = timm.create_model(name, **SMALL) if variants.VARIANTS[name].arch["tokenizer"] != "patch" \
        else timm.create_model(name, img_size=32)
    first = model.pretrained_cfg["first_conv"]
    assert first + ".weight" in model.state_dict()
    layer = model.get_submodule(first)
    in_width = layer.weight.shape[1]
    # the image's channels (patch/conv), or a soft split of them (3 · kernel²) for the T2T layers
    assert in_width == 3 or (in_width % 3 == 0 and (in_width // 3) ** 0.5 % 1 == 0)


@pytest.mark.parametrize("tag", ["t2t_vit_7.in1k", "t2t_vit_24.tl_in1k"])
def test_tag_loads_with_other_channels_and_classes(monkeypatch, server, tag):
    """timm's pretrained-load contract: a tag loads into a 1-channel model with 5 classes and as a
    headless feature extractor, from one download."""
    release = variants.RELEASES[tag]
    torch.manual_seed(3)
    ema = timm.create_model(tag, **SMALL).eval()
    monkeypatch.setitem(variants.RELEASES, tag, dataclasses.replace(release, size=None, digest=None))  # not the real file
    serve_tag(monkeypatch, server, tag, authors_bytes(ema, None))
    grey = timm.create_model(tag, pretrained=True, in_chans=1, num_classes=5, **SMALL).eval()
    headless = timm.create_model(tag, pretrained=True, in_chans=1, num_classes=0, **SMALL).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = ema.forward_head(ema.forward_features(x.expand(-1, 3, -1, -1)), pre_logits=True)
        torch.testing.assert_close(headless(x), features, atol=1e-5, rtol=1e-5)
        assert grey(x).shape == (2, 5)
    assert server.requests == [release.file]

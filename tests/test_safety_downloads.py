"""Issue 23, sources and downloads: a file never chooses a source or a download; a release is
checked by its digest, garbage and slow servers are one line and leave nothing in the cache.
Every server is on 127.0.0.1. (Local files: tests/test_safety_loading.py.)"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import socketserver
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
from timm.models import _registry

import t2t_vit
from t2t_vit import cli, variants
from t2t_vit.checkpoint import model_from_checkpoint
from t2t_vit.errors import T2TViTError
from t2t_vit.hub import cache_dir
from t2t_vit.pretrained import from_pretrained, save_pretrained
from t2t_vit.storage import save_weights

from helpers import GARBAGE, SMALL, authors_file, image, one_line, poisoned, small

RELEASE = "71.7_T2T_ViT_7.pth.tar"


class Recorder:
    """A loopback server that serves ``files`` and records every request it receives."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.requests.append(self.path)
                body = outer.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    srv = Recorder()
    yield srv
    srv.close()


def cache_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "torch").rglob("*") if p.is_file()]


# ---- item 1: metadata never chooses a source, a download, a file or a size ---------------------
@pytest.mark.parametrize("model", ["t2t_vit_7.in1k", "t2t_vit_7", "t2t_vit_7.in1k_ft_cifar10"])
def test_poisoned_checkpoint_fetches_and_plants_nothing(server, tmp_path, capsys, model):
    """The attack of issue 23: ``pretrained`` + an overlay URL in model_kwargs. The server holds
    a loadable file, so a download would succeed and plant it in the cache as the release."""
    server.files[RELEASE] = authors_file(small(seed=1))
    path = poisoned(tmp_path, model, pretrained=True, pretrained_cfg_overlay={"url": server.url + RELEASE})
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path)
    one_line(err, str(path), "'pretrained'", "never chooses")
    assert cli.main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert "never chooses" in capsys.readouterr().err
    assert cli.main(["predict", str(image(tmp_path)), "--checkpoint", str(path)]) == 2  # the command
    assert "never chooses" in capsys.readouterr().err
    assert server.requests == [] and cache_files(tmp_path) == [] and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("model, kwargs, key", [
    ("resnet18", {"pretrained": True}, "'pretrained'"),  # would reach for the Hugging Face Hub
    ("t2t_vit_7.in1k", {"checkpoint_path": "/etc/passwd"}, "'checkpoint_path'"),
    ("t2t_vit_7", {"cache_dir": "/tmp"}, "'cache_dir'"),
    ("t2t_vit_14", {"features_only": True}, "'features_only'"),
    ("resnet18", {"hf_hub_id": "evil/model"}, "'hf_hub_id'"),
    ("t2t_vit_7", {"device": "meta"}, "'device'"),
])
def test_source_arguments_are_refused_for_any_model_name(server, tmp_path, model, kwargs, key):
    path = poisoned(tmp_path, model, **kwargs)
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path)
    one_line(err, key)
    assert server.requests == []


def test_pretrained_folder_config_cannot_choose_a_source(server, tmp_path):
    """config.json's ``architecture`` may carry a tag; its ``model_args`` and ``pretrained_cfg``
    still never choose a download, through from_pretrained or timm's ``local-dir:``."""
    server.files[RELEASE] = authors_file(small(seed=1))
    folder = save_pretrained(small(), tmp_path / "pre")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "t2t_vit_7.in1k"
    config["pretrained_cfg"].update(url=server.url + RELEASE, hf_hub_id="evil/model")
    (folder / "config.json").write_text(json.dumps(config))
    assert server.url not in str(from_pretrained(folder).pretrained_cfg)  # loads, its cfg names no source of its own
    for poison in ({"pretrained": True, "pretrained_cfg_overlay": {"url": server.url + RELEASE}},
                   {"checkpoint_path": "/etc/passwd"}):
        config["model_args"] = {**config["model_args"], **poison}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(T2TViTError) as err:
            from_pretrained(folder)
        one_line(err, "never chooses")
        with pytest.raises((T2TViTError, TypeError)):
            timm.create_model("local-dir:" + str(folder), pretrained=True)
    assert server.requests == [] and cache_files(tmp_path) == []


def test_a_local_file_handed_by_timm_is_screened(server, tmp_path):
    """``pretrained_cfg_overlay=dict(file=...)`` reads a local file: its metadata is checked as
    model_from_checkpoint checks it, before timm reads the weights."""
    path = poisoned(tmp_path, "t2t_vit_7", checkpoint_path="/etc/passwd")
    with pytest.raises(T2TViTError) as err:
        timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    one_line(err, "'checkpoint_path'")
    honest = save_weights(small(), tmp_path / "honest.safetensors",
                          metadata=dict(format="t2t-vit", model="t2t_vit_7", model_kwargs={"stem": "small"}))
    model = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(honest)), **SMALL)
    torch.testing.assert_close(model.state_dict()["blocks.0.mlp.fc1.weight"], small().state_dict()["blocks.0.mlp.fc1.weight"])


def point_tag_at(monkeypatch, server: Recorder, tag: str, body: bytes, **release) -> Path:
    """Serve ``body`` as ``tag``'s release from the loopback server; ``release`` replaces fields
    of its :class:`t2t_vit.variants.Release` (size, digest)."""
    entry = variants.RELEASES[tag]
    cfg = _registry._model_pretrained_cfgs[tag]
    monkeypatch.setitem(_registry._model_pretrained_cfgs, tag, dataclasses.replace(cfg, url=server.url + entry.file))
    monkeypatch.setitem(variants.RELEASES, tag, dataclasses.replace(entry, **release))
    server.files[entry.file] = body
    return cache_dir() / entry.file


def test_release_digest_is_checked_on_download_and_on_every_use(monkeypatch, server, tmp_path):
    """A known digest refuses a replaced file (nothing cached) and a copy planted in the cache
    (downloaded again, so the release is what loads)."""
    released = small(seed=1)
    body = authors_file(released)
    wrong = "sha384:" + hashlib.sha384(b"another file").hexdigest()
    cached = point_tag_at(monkeypatch, server, "t2t_vit_7.in1k", body, digest=wrong)
    with pytest.raises(T2TViTError) as err:
        t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, **SMALL)
    one_line(err, "SHA384 does not match", "nothing was cached")
    assert cache_files(tmp_path) == []
    point_tag_at(monkeypatch, server, "t2t_vit_7.in1k", body, digest="sha384:" + hashlib.sha384(body).hexdigest())
    cached.write_bytes(authors_file(small(seed=2)))  # planted, e.g. by a poisoned checkpoint before this fix
    model = t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, **SMALL)
    assert len(server.requests) == 2 and cached.read_bytes() == body
    key = "blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(model.state_dict()[key], released.state_dict()[key])


def test_the_one_published_digest_is_recorded():
    assert variants.RELEASES["t2t_vit_14.in1k"].digest.startswith("sha384:98c8ae06a1e9997f")
    assert len(variants.RELEASES["t2t_vit_14.in1k"].digest) == len("sha384:") + 96


# ---- item 11: bytes served as a release that are no checkpoint; URLs that are no download -------
@pytest.mark.parametrize("body", GARBAGE, ids=repr)
def test_garbage_served_as_a_release_leaves_nothing_in_the_cache(monkeypatch, server, tmp_path, body):
    point_tag_at(monkeypatch, server, "t2t_vit_7.in1k", body, size=None, digest=None)
    with pytest.raises(T2TViTError) as err:
        t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, **SMALL)
    one_line(err, server.url + RELEASE, "nothing was cached")
    assert cache_files(tmp_path) == [] and len(server.requests) == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.pth", "http://127.0.0.1:1/"])
def test_only_http_downloads_of_a_named_file(monkeypatch, server, tmp_path, url):
    with pytest.raises(T2TViTError) as err:
        t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, pretrained_cfg_overlay=dict(url=url), **SMALL)
    one_line(err, "refusing to download", repr(url))
    assert cache_files(tmp_path) == []


# ---- item 8: one deadline per download, stale partials cleaned, readable cache ------------------
class Trickle(socketserver.StreamRequestHandler):
    """Sends a response one byte every 0.3 s (for at most 20 s): from its first header byte
    (``headers``), or after complete headers announcing 10 kB (``body``)."""

    where = "body"

    def handle(self) -> None:
        self.rfile.readline()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n"
        if self.where == "body":
            self.wfile.write(head)
        stream = head * 3 if self.where == "headers" else b"\x80" * 70
        try:
            for byte in stream[:70]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass  # the client gave up, as it should


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_trickling_server_meets_one_deadline(monkeypatch, tmp_path, where):
    """Each byte comes well within the per-read timeout; the whole download still stops at the
    deadline ($T2T_VIT_DOWNLOAD_TIMEOUT) with one line and nothing cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("T2T_VIT_DOWNLOAD_TIMEOUT", "1.5")
    monkeypatch.setattr(Trickle, "where", where)
    httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Trickle)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{RELEASE}"
    try:
        started = time.monotonic()
        with pytest.raises(T2TViTError) as err:
            t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, pretrained_cfg_overlay=dict(url=url), **SMALL)
        elapsed = time.monotonic() - started
    finally:
        httpd.shutdown()
        httpd.server_close()
    one_line(err, url, "not complete after 1.5 s", "nothing was cached", "T2T_VIT_DOWNLOAD_TIMEOUT")
    assert elapsed < 8, elapsed
    assert cache_files(tmp_path) == []
    monkeypatch.setenv("T2T_VIT_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(T2TViTError, match="T2T_VIT_DOWNLOAD_TIMEOUT='soon' must be a positive number"):
        t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, pretrained_cfg_overlay=dict(url=url), **SMALL)


def test_stale_partials_are_cleaned_and_downloads_are_readable_by_others(monkeypatch, server, tmp_path):
    folder = cache_dir()
    folder.mkdir(parents=True)
    stale, fresh = folder / ".x.pth.abc123.partial", folder / ".y.pth.def456.partial"
    stale.write_bytes(b"left by a SIGKILLed download")
    fresh.write_bytes(b"a download in progress elsewhere")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    cached = point_tag_at(monkeypatch, server, "t2t_vit_7.in1k", authors_file(small()), size=None, digest=None)
    old_umask = os.umask(0o022)
    try:
        t2t_vit.create_model("t2t_vit_7.in1k", pretrained=True, **SMALL)
    finally:
        os.umask(old_umask)
    assert not stale.exists() and fresh.exists()
    assert cached.stat().st_mode & 0o777 == 0o644

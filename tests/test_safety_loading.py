"""Issue 23, loading: a file never chooses a source, a download, a file or a size; hostile bytes,
slow servers and huge records are one line and leave nothing behind. Every server is on 127.0.0.1."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import socketserver
import threading
import time
import zipfile
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
from t2t_vit.reading import check_zip_bounds
from t2t_vit.storage import save_weights

SMALL = dict(img_size=32, stem="small", num_classes=10)
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


def small(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return t2t_vit.create_model("t2t_vit_7", **SMALL).eval()


def authors_file(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict_ema": {"module." + k: v for k, v in model.state_dict().items()}}, buffer)
    return buffer.getvalue()


def poisoned(tmp_path: Path, model: str, honest: dict | None = None, **kwargs) -> Path:
    """One of our checkpoints whose metadata asks for ``kwargs`` on top of an honest small model."""
    honest = {"img_size": 32, "stem": "small"} if honest is None else honest
    meta = dict(format="t2t-vit", model=model, model_kwargs={**honest, **kwargs},
                num_classes=10)
    return save_weights(small(), tmp_path / "poison.safetensors", metadata=meta)


def cache_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "torch").rglob("*") if p.is_file()]


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


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


# ---- item 6: NaN and Inf weights are refused at load -------------------------------------------
def honest(tmp_path: Path, model: torch.nn.Module | None = None, name: str = "ok.safetensors") -> Path:
    meta = dict(format="t2t-vit", model="t2t_vit_7", model_kwargs={"img_size": 32, "stem": "small"}, num_classes=10)
    return save_weights(model if model is not None else small(), tmp_path / name, metadata=meta)


def image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(path)
    return path


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


# ---- item 11: bytes that are no checkpoint; URLs that are no download ---------------------------
GARBAGE = [b"error code: 1020", b"Moved", b"hello", b"rr", b"", b"\x80\x02garbage", b"<html>\n<h1>404</h1>"]


@pytest.mark.parametrize("body", GARBAGE, ids=repr)
def test_garbage_bytes_are_one_line(tmp_path, capsys, body):
    path = tmp_path / "x.pth.tar"
    path.write_bytes(body)
    with pytest.raises(T2TViTError) as err:
        model_from_checkpoint(path)
    one_line(err, "not a PyTorch or safetensors checkpoint")
    assert cli.main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "out.safetensors").exists()


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

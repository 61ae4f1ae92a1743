"""Released weights: download once into torch's cache, then read them like any local file.

The cache is torch.hub's (``$TORCH_HOME/hub/checkpoints``, the folder timm uses too), so a file
fetched once is found offline afterwards. A download is written to a temporary file beside its
final name and renamed only when complete: its length is checked against the server's
``Content-Length`` (torch.hub's own downloader accepts a connection closed early) and against
the published size where there is one. A failed, truncated or unreadable download is one line
naming the URL and the cause and leaves nothing in the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from t2t_vit.adapting import Guess, LoadReport, load_adapted
from t2t_vit.errors import T2TViTError
from t2t_vit.reading import read_checkpoint

_log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """torch.hub's checkpoint folder (honours ``TORCH_HOME``), shared with timm."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _stream(url: str, tmp: Path, progress: bool) -> int:
    """Copy ``url`` into ``tmp``; the number of bytes, checked against Content-Length."""
    with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as out:  # noqa: S310 (https URLs from the cfg)
        expected = response.headers.get("Content-Length")
        received = 0
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
            if progress:
                _log.info("%s: %d bytes", url, received)
    if expected is not None and expected.isdigit() and received != int(expected):
        raise T2TViTError(f"could not download {url}: the connection closed after {received} of {expected} bytes "
                          "(truncated download); nothing was cached, try again")
    return received


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of ``path`` (``algorithm`` as :func:`hashlib.new` names it, e.g. ``sha384``)."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_matches(path: Path, digest: str) -> bool:
    algorithm, _, expected = digest.partition(":")
    return file_digest(path, algorithm) == expected.lower()


def _check(url: str, path: Path, size: int | None, digest: str | None) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise T2TViTError(f"could not download {url}: got {actual} bytes, the published file has {size} "
                          "(truncated or replaced); nothing was cached, try again")
    if digest and not _digest_matches(path, digest):
        raise T2TViTError(f"could not download {url}: its {digest.partition(':')[0].upper()} does not match the "
                          "published one (replaced or corrupted); nothing was cached")


def _cached(path: Path, size: int | None, digest: str | None) -> bool:
    """Whether the cached ``path`` is the published file; a copy that is not is downloaded again
    (a digest is checked on every use, so a file planted in the cache is never loaded as the release)."""
    if not path.is_file():
        return False
    if (size is None or path.stat().st_size == size) and (not digest or _digest_matches(path, digest)):
        return True
    _log.warning("%s is not the published file (size or digest differ): downloading it again", path)
    return False


def download_cached(url: str, file_name: str | None = None, size: int | None = None, digest: str | None = None,
                    progress: bool = False, folder: str | os.PathLike | None = None) -> Path:
    """The cached copy of ``url`` in ``folder`` (default :func:`cache_dir`), downloaded first if
    absent or not the published file. ``digest`` is ``"sha384:<hex>"`` (any :mod:`hashlib` name)."""
    folder = Path(folder) if folder else cache_dir()
    path = folder / (file_name or os.path.basename(urlparse(url).path))
    if _cached(path, size, digest):
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
        os.close(fd)
    except OSError as err:
        raise T2TViTError(f"could not download {url}: cannot write to the cache {folder} ({err})") from err
    tmp = Path(name)
    try:
        _log.info("downloading %s to %s", url, path)
        _stream(url, tmp, progress)
        _check(url, tmp, size, digest)
        os.replace(tmp, path)
    except urllib.error.HTTPError as err:
        raise T2TViTError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise T2TViTError(f"could not download {url}: {err.reason} (offline? use a local copy: "
                          "--checkpoint FILE on the command line, checkpoint_path=FILE in Python)") from err
    except (OSError, HTTPException) as err:
        raise T2TViTError(f"could not download {url}: {type(err).__name__}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_released(model: nn.Module, cfg: Mapping[str, Any], guess: Guess | None = None,
                  size: int | None = None, digest: str | None = None,
                  folder: str | os.PathLike | None = None) -> LoadReport:
    """Download (once) the weights ``cfg["url"]`` names and load them into ``model`` (EMA preferred);
    ``folder`` replaces the cache folder (timm's ``cache_dir=``)."""
    url = cfg["url"]
    path = download_cached(url, size=size, digest=digest, folder=folder)
    try:
        state_dict, source, meta = read_checkpoint(path)
    except T2TViTError as err:
        path.unlink(missing_ok=True)
        raise T2TViTError(f"{url}: the downloaded file is not a readable checkpoint ({err}); removed it from "
                          "the cache, the next try downloads it again") from err
    report = LoadReport(path=url, source=source)
    return load_adapted(model, state_dict, meta, report, strict=True, new_head=True, guess=guess)

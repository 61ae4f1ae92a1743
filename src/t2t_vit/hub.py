"""Released weights: download once into torch's cache, then read them like any local file.

The cache is torch.hub's (``$TORCH_HOME/hub/checkpoints``, the folder timm uses too), so a file
fetched once is found offline afterwards. Only ``http``/``https`` URLs are fetched. A download is
written to a temporary ``.partial`` file beside its final name and renamed only when it is
complete and readable: its length is checked against the server's ``Content-Length`` (torch.hub's
own downloader accepts a connection closed early), against the published size and digest where
there are some, and it is read as a checkpoint before it enters the cache. The whole download has
one deadline (:data:`DEADLINE_ENV`), not a per-read timeout that a server trickling bytes never
trips. A failed, truncated, slow or unreadable download is one line naming the URL and the cause
and leaves nothing in the cache; ``.partial`` files left by a killed process are removed by the
next download once they are :data:`STALE_PARTIAL` seconds old. Cached files are readable by the
group and others (a shared ``TORCH_HOME``), as the umask allows.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlparse

import torch
from torch import nn

from t2t_vit.adapting import Guess, LoadReport, load_adapted
from t2t_vit.errors import T2TViTError
from t2t_vit.reading import not_a_checkpoint, read_checkpoint

_log = logging.getLogger(__name__)
_CHUNK = 1 << 20
DEADLINE_ENV = "T2T_VIT_DOWNLOAD_TIMEOUT"  # seconds a whole download may take
DEFAULT_DEADLINE = 3600.0  # the largest release (~250 MB) at 70 kB/s
_READ_TIMEOUT = 60.0  # seconds one socket read may wait (within the deadline)
STALE_PARTIAL = 24 * 3600  # seconds after which a .partial file is a leftover of a killed download
T = TypeVar("T")


def cache_dir() -> Path:
    """torch.hub's checkpoint folder (honours ``TORCH_HOME``), shared with timm."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_deadline() -> float:
    """Seconds a whole download may take: ``$T2T_VIT_DOWNLOAD_TIMEOUT``, else :data:`DEFAULT_DEADLINE`."""
    raw = os.environ.get(DEADLINE_ENV, "").strip()
    if not raw:
        return DEFAULT_DEADLINE
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise T2TViTError(f"{DEADLINE_ENV}={raw!r} must be a positive number of seconds")
    return value


class _Deadline:
    """Cuts every connection a download opened once its deadline passes, whatever it is waiting
    for (headers trickled byte by byte included): a timer shuts the sockets down."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.expired, self._connections = seconds, False, []
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def _track(self, http_class: Callable[..., Any]) -> Callable[..., Any]:
        def make(*args: Any, **kwargs: Any) -> Any:
            self._connections.append(http_class(*args, **kwargs))
            return self._connections[-1]
        return make

    def _cut(self) -> None:
        self.expired = True
        for connection in self._connections:
            with contextlib.suppress(OSError, AttributeError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    def opener(self) -> urllib.request.OpenerDirector:
        track = self._track

        class Http(urllib.request.HTTPHandler):
            def do_open(self, http_class, req, **kwargs):  # noqa: ANN001 (urllib's signature)
                return super().do_open(track(http_class), req, **kwargs)

        class Https(urllib.request.HTTPSHandler):
            def do_open(self, http_class, req, **kwargs):  # noqa: ANN001 (urllib's signature)
                return super().do_open(track(http_class), req, **kwargs)

        return urllib.request.build_opener(Http, Https)

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


def _stream(url: str, tmp: Path, progress: bool) -> int:
    """Copy ``url`` into ``tmp`` within :func:`download_deadline` (the whole transfer, headers
    included); the number of bytes, checked against Content-Length."""
    received, expected = 0, None
    with _Deadline(download_deadline()) as deadline:
        try:
            with deadline.opener().open(url, timeout=min(_READ_TIMEOUT, deadline.seconds)) as response, \
                    tmp.open("wb") as out:
                expected = response.headers.get("Content-Length")
                while not deadline.expired and (chunk := response.read1(_CHUNK)):
                    out.write(chunk)
                    received += len(chunk)
                    if progress:
                        _log.info("%s: %d bytes", url, received)
        except (OSError, HTTPException):
            if not deadline.expired:
                raise
        if deadline.expired:
            raise T2TViTError(f"could not download {url}: not complete after {deadline.seconds:g} s ({received} "
                              f"bytes so far); nothing was cached (set {DEADLINE_ENV} to allow longer)")
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


def _check_bytes(url: str, tmp: Path) -> None:
    """A body that cannot be a checkpoint (a CDN block page, a redirect notice) never enters the cache."""
    reason = not_a_checkpoint(tmp)
    if reason:
        raise T2TViTError(f"could not download {url}: the server sent no checkpoint ({reason}); nothing was cached")


def _cached(path: Path, size: int | None, digest: str | None) -> bool:
    """Whether the cached ``path`` is the published file; a copy that is not is downloaded again
    (a digest is checked on every use, so a file planted in the cache is never loaded as the release)."""
    if not path.is_file():
        return False
    if (size is None or path.stat().st_size == size) and (not digest or _digest_matches(path, digest)):
        return True
    _log.warning("%s is not the published file (size or digest differ): downloading it again", path)
    return False


def _target(url: str, file_name: str | None, folder: str | os.PathLike | None) -> Path:
    """Where ``url`` is cached; refuses a URL that is not http(s) or names no file."""
    if urlparse(url).scheme not in ("http", "https"):
        raise T2TViTError(f"refusing to download {url!r}: only http and https URLs are fetched (a local file is "
                          "passed as checkpoint_path= or pretrained_cfg_overlay=dict(file=...))")
    name = file_name or os.path.basename(urlparse(url).path)
    if not name or name in (".", ".."):
        raise T2TViTError(f"refusing to download {url!r}: it names no file")
    return (Path(folder) if folder else cache_dir()) / name


def remove_stale_partials(folder: Path, age: float = STALE_PARTIAL) -> list[Path]:
    """Remove ``.partial`` files older than ``age`` seconds (left by a killed download); a younger
    one may belong to a download in progress in another process."""
    removed = []
    for leftover in folder.glob(".*.partial"):
        try:
            if time.time() - leftover.stat().st_mtime > age:
                leftover.unlink()
                removed.append(leftover)
        except OSError as err:  # gone meanwhile, or not ours to remove
            _log.debug("could not remove %s: %s", leftover, err)
    return removed


def _publish(tmp: Path, path: Path) -> None:
    """Rename a complete download into place, readable as the umask allows (mkstemp made it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _download(url: str, path: Path, size: int | None, digest: str | None, progress: bool,
              read: Callable[[Path], T] | None = None) -> T | None:
    """Fetch ``url`` into ``path`` through a ``.partial`` file; ``read`` is applied to the complete
    file before it is renamed into the cache (so an unreadable body is never cached)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise T2TViTError(f"could not download {url}: cannot write to the cache {path.parent} ({err})") from err
    tmp = Path(name)
    try:
        _log.info("downloading %s to %s", url, path)
        _stream(url, tmp, progress)
        _check(url, tmp, size, digest)
        _check_bytes(url, tmp)
        result = _read_download(url, tmp, read) if read else None
        _publish(tmp, path)
        return result
    except urllib.error.HTTPError as err:
        raise T2TViTError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise T2TViTError(f"could not download {url}: {err.reason} (offline? use a local copy: "
                          "--checkpoint FILE on the command line, checkpoint_path=FILE in Python)") from err
    except (OSError, HTTPException) as err:
        raise T2TViTError(f"could not download {url}: {type(err).__name__}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def _read_download(url: str, tmp: Path, read: Callable[[Path], T]) -> T:
    try:
        return read(tmp)
    except T2TViTError as err:
        raise T2TViTError(f"could not download {url}: the file is not a readable checkpoint ({err}); "
                          "nothing was cached") from err


def download_cached(url: str, file_name: str | None = None, size: int | None = None, digest: str | None = None,
                    progress: bool = False, folder: str | os.PathLike | None = None) -> Path:
    """The cached copy of ``url`` in ``folder`` (default :func:`cache_dir`), downloaded first if
    absent or not the published file. ``digest`` is ``"sha384:<hex>"`` (any :mod:`hashlib` name)."""
    path = _target(url, file_name, folder)
    if not _cached(path, size, digest):
        _download(url, path, size, digest, progress)
    return path


def load_released(model: nn.Module, cfg: Mapping[str, Any], guess: Guess | None = None,
                  size: int | None = None, digest: str | None = None,
                  folder: str | os.PathLike | None = None) -> LoadReport:
    """Download (once) the weights ``cfg["url"]`` names and load them into ``model`` (EMA preferred);
    ``folder`` replaces the cache folder (timm's ``cache_dir=``)."""
    url = cfg["url"]
    path = _target(url, None, folder)
    if _cached(path, size, digest):
        try:
            state_dict, source, meta = read_checkpoint(path)
        except T2TViTError as err:
            path.unlink(missing_ok=True)
            raise T2TViTError(f"{url}: the cached file is not a readable checkpoint ({err}); removed it from "
                              "the cache, the next try downloads it again") from err
    else:
        state_dict, source, meta = _download(url, path, size, digest, False, read=read_checkpoint)
    report = LoadReport(path=url, source=source)
    return load_adapted(model, state_dict, meta, report, strict=True, new_head=True, guess=guess)

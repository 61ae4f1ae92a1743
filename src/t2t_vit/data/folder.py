"""ImageFolder trees (``train/`` and ``val/`` of class folders) that survive bad files.

Policy: a cheap check at scan time (PIL reads the header; the JPEG/PNG end marker is looked up
with one seek) keeps start-up fast on large sets; images are decoded only when loaded, and a file
that still fails then is replaced by another image of the same class, so an epoch never crashes.
Every skipped file is named once in a warning and recorded in ``skipped``.
"""
from __future__ import annotations

import bisect
import logging
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from t2t_vit.errors import T2TViTError

log = logging.getLogger("t2t_vit.data")

MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb limit (~ 9459 x 9459)
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation")}
VERIFY_MODES = ("header", "full", "none")
_TAIL_BYTES = 4096  # where a JPEG's end-of-image marker must appear (allows trailing padding)


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image (unrecognised file format)"
    if isinstance(e, Image.DecompressionBombError):
        return "image too large (decompression bomb)"
    if isinstance(e, OSError) and e.strerror:
        return f"unreadable ({e.strerror})"
    return f"unreadable ({type(e).__name__}: {e})"


def _size_reason(img: Image.Image, max_pixels: int) -> str | None:
    w, h = img.size
    if w * h > max_pixels:
        return f"image too large ({w}x{h} = {w * h} pixels > limit {max_pixels})"
    if w == 0 or h == 0:
        return f"empty image ({w}x{h})"
    return None


NOT_REGULAR = "not a regular file (not opened)"


def _regular_file_reason(path: str) -> str | None:
    """Why ``path`` must not be opened: a FIFO blocks ``open`` forever, a device never ends."""
    try:
        mode = os.stat(path).st_mode  # stat, not open: it never blocks
    except OSError:
        return None  # open() reports it with its usual error
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else NOT_REGULAR


def check_image(path: str, verify: str = "header", max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Return why ``path`` cannot be used, or ``None`` if it looks like a usable image.

    ``header``: PIL parses the header (format, size) and JPEG/PNG files must end with their end
    marker (catches truncated files without decoding); ``full``: decodes the whole image.
    """
    reason = _regular_file_reason(path)
    if reason:
        return reason
    try:
        with open(path, "rb") as f:
            img = Image.open(f)  # header only; PIL's own bomb warning is muted by scan_split
            reason = _size_reason(img, max_pixels)
            if reason:
                return reason
            if verify == "full":
                img.load()
                return None
            if img.format == "JPEG":
                f.seek(-min(_TAIL_BYTES, f.seek(0, os.SEEK_END)), os.SEEK_END)
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
            elif img.format == "PNG":
                f.seek(-min(64, f.seek(0, os.SEEK_END)), os.SEEK_END)
                if b"IEND" not in f.read():
                    return "truncated PNG (no IEND chunk)"
    except Exception as e:  # noqa: BLE001 - any failure makes the file unusable, never a crash
        return _reason(e)
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit greys scaled (not clipped), palettes with transparency via RGBA."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``path`` (or an open binary file) fully as an EXIF-upright RGB image; raises
    ``OSError``/``ValueError`` if bad."""
    is_path = isinstance(path, (str, os.PathLike))
    reason = _regular_file_reason(path) if is_path else None
    if reason:
        raise ValueError(reason)
    with (open(path, "rb") if is_path else path) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(f)
        reason = _size_reason(img, max_pixels)
        if reason:
            raise ValueError(reason)
        img.load()  # full decode inside the guarded block: truncated data raises here
    return to_rgb(ImageOps.exif_transpose(img))


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples decoded on access; a file that fails is replaced, never fatal.

    Other storage (``data/readers.py``) overrides :meth:`open`, so its samples are keys, not paths."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.samples = samples
        self.classes = classes
        self.targets = [label for _, label in samples]
        self.transform = transform
        self.max_pixels = max_pixels
        self.bad: dict[str, str] = {}  # files that failed at load time in this process
        self._by_class: dict[int, list[int]] = {}
        for i, label in enumerate(self.targets):
            self._by_class.setdefault(label, []).append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def open(self, path):
        """What :func:`load_image` reads for the sample whose key is ``path``: here the path itself."""
        return path

    def _candidates(self, index: int):
        """``index`` first, then the rest of its class in order, then everything else."""
        same = self._by_class[self.targets[index]]
        k = bisect.bisect_left(same, index)
        yield from (same[(k + m) % len(same)] for m in range(len(same)))  # lazy: usually one step
        n = len(self.samples)
        yield from (j % n for j in range(index + 1, index + n) if self.targets[j % n] != self.targets[index])

    def __getitem__(self, index: int):
        for j in self._candidates(index):
            path, label = self.samples[j]
            if path in self.bad:
                continue
            try:
                img = load_image(self.open(path), self.max_pixels)
            except Exception as e:  # noqa: BLE001 - skip the file, keep the epoch going
                self.bad[path] = str(e) if isinstance(e, ValueError) else _reason(e)
                log.warning("skipping %s: %s (failed at load; using another image instead)", path, self.bad[path])
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise T2TViTError(f"no image of the data set could be loaded (last tried {path}).")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def images_under(root: str | os.PathLike) -> list[str]:
    """The image files under the folder ``root`` (the extensions training reads), folder by folder
    in sorted order; hidden entries skipped, links to folders not followed (no loops)."""
    found: list[str] = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [os.path.join(folder, n) for n in sorted(names) if _is_image(n)]
    return found


def _list_split(split_dir: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Class names, candidate ``(path, label)`` files and skipped folders/files of one split."""
    try:
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError as e:
        raise T2TViTError(f"cannot read {split_dir}: {e.strerror or e}.") from e
    tree = os.path.realpath(split_dir)
    classes, skipped = _class_folders(entries, tree)
    skipped += [(e.path, "image outside a class folder") for e in entries if _is_image(e.name) and not e.is_dir()]
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        errors: list[OSError] = []
        found, links = _walk_class(class_dir, tree, errors)
        skipped += links
        skipped += [(e.filename or class_dir, f"unreadable folder ({e.strerror or e})") for e in errors]
        if not found and not errors:
            skipped.append((class_dir, "empty class folder (no image files)"))
        files += [(p, label) for p in found]
    return classes, files, skipped


def _class_folders(entries: list[os.DirEntry], tree: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Class names, and the linked folders that are no class: a link into the split tree (``c3 -> c0``,
    ``c4 -> .``) or a second link to a folder already taken would count the same images again under
    another label. A link to a folder outside the tree is a class like any other."""
    classes: list[str] = []
    skipped: list[tuple[str, str]] = []
    taken: dict[tuple[int, int] | str, str] = {}
    for e in entries:
        if e.name.startswith(".") or not e.is_dir():
            continue
        real = os.path.realpath(e.path)
        if e.is_symlink() and _inside(real, tree):
            skipped.append((e.path, "link into the data tree (not a class; not followed)"))
            continue
        identity = _identity(e.path)
        if identity in taken:
            skipped.append((e.path, f"same folder as class {taken[identity]!r} (not a class; not followed)"))
            continue
        taken[identity] = e.name
        classes.append(e.name)
    return classes, skipped


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip(os.sep) + os.sep)


def _walk_class(class_dir: str, tree: str, errors: list[OSError]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``class_dir`` and the links not followed.

    Links to folders or files outside the split tree are followed; a link that resolves back into
    the tree (``tree`` is its real path) or to a folder already scanned (a loop) is skipped and
    named, so no image is counted twice and a loop cannot make the walk endless.
    """
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    seen = {_identity(class_dir)}
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=errors.append, followlinks=True):
        keep = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, name)
            reason = _link_reason(path, tree)
            identity = _identity(path)
            if reason is None and identity in seen:
                reason = "link loop (folder already scanned; not followed)"
            if reason:
                skipped.append((path, reason))
                continue
            seen.add(identity)
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(f for f in filenames if _is_image(f)):
            path = os.path.join(dirpath, name)
            reason = _link_reason(path, tree) or _regular_file_reason(path)
            if reason:
                skipped.append((path, reason))
            else:
                found.append(path)
    return found, skipped


def _identity(path: str) -> tuple[int, int] | str:
    try:
        st = os.stat(path)
    except OSError:
        return path  # unreadable: os.walk reports it through onerror
    return st.st_dev, st.st_ino


def _link_reason(path: str, tree: str) -> str | None:
    if os.path.islink(path) and _inside(os.path.realpath(path), tree):
        return "link back into the data tree (not followed)"
    return None


def _verify_split(split_dir: Path, listing, verify: str, max_pixels: int, workers: int = 16):
    """Check the files of one listed split: ``(samples, skipped)``; each skipped path is logged once."""
    classes, files, skipped = listing
    if verify == "none":
        reasons = [None] * len(files)
    else:  # header reads are I/O bound: threads overlap them (and the GIL is released in file reads)
        # warning filters are process-global: set them here once, not inside the threads
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_image names them
            reasons = list(pool.map(lambda pf: check_image(pf[0], verify, max_pixels), files, chunksize=64))
    samples = [pf for pf, r in zip(files, reasons) if r is None]
    skipped = skipped + [(pf[0], r) for pf, r in zip(files, reasons) if r is not None]
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    used, listed = {label for _, label in samples}, {label for _, label in files}
    for label in sorted(listed - used):
        log.warning("class %r in %s has no usable image", classes[label], split_dir)
    msg = "%s: %d images in %d classes, %d skipped"
    (log.warning if skipped else log.info)(msg, split_dir, len(samples), len(classes), len(skipped))
    return samples, skipped


def scan_split(split_dir: Path, verify: str = "header", max_pixels: int = MAX_IMAGE_PIXELS):
    """Scan one split folder: ``(classes, samples, skipped)``."""
    listing = _list_split(split_dir)
    return (listing[0], *_verify_split(split_dir, listing, verify, max_pixels))


def _split_dir(root: Path, split: str) -> Path:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    raise T2TViTError(f"{root} has no {split}/ folder "
                      "(an ImageFolder root needs train/ and val/ of class folders).")


def create_imagefolder(root: Path, train_tf: Callable | None, eval_tf: Callable | None, verify: str = "header",
                       max_pixels: int = MAX_IMAGE_PIXELS):
    """Scan ``root/train`` and ``root/val``; returns ``(train_ds, val_ds, class_names, skipped)``."""
    if verify not in VERIFY_MODES:
        raise T2TViTError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}.")
    train_dir, val_dir = _split_dir(root, "train"), _split_dir(root, "val")
    train_listing, val_listing = _list_split(train_dir), _list_split(val_dir)
    train_classes, val_classes = train_listing[0], val_listing[0]
    if train_classes != val_classes:  # checked before any file is opened: fails fast on big sets
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise T2TViTError(f"train/ and val/ class folders disagree in {root}: only in train: "
                          f"{', '.join(only_t) or '-'}; only in val: {', '.join(only_v) or '-'}.")
    train_samples, train_skipped = _verify_split(train_dir, train_listing, verify, max_pixels)
    val_samples, val_skipped = _verify_split(val_dir, val_listing, verify, max_pixels)
    for split_dir, samples, skipped in ((train_dir, train_samples, train_skipped),
                                        (val_dir, val_samples, val_skipped)):
        if not samples:
            raise T2TViTError(f"no usable images in {split_dir} ({len(skipped)} files or folders skipped, "
                              "see the warnings above).")
    train = ImageFolderDataset(train_samples, train_classes, train_tf, max_pixels)
    val = ImageFolderDataset(val_samples, val_classes, eval_tf, max_pixels)
    return train, val, train_classes, train_skipped + val_skipped

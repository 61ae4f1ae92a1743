"""In-memory data sets: scikit-learn's digits (the demo) and CIFAR-10/100 python-pickle folders."""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from t2t_vit.errors import T2TViTError

DIGITS_SPLIT_SEED = 0  # fixed: the demo's train/val split never changes
DIGITS_VAL_FRACTION = 0.2
CACHE_LIMIT_BYTES = 256 * 2**20  # pre-compute deterministic outputs when they fit in this much memory


class ArrayDataset(Dataset):
    """uint8 ``(N, H, W, 3)`` images + int labels, transformed on access.

    With a deterministic transform (``cache=True``) every output is computed once at construction
    and indexing is a tensor lookup, so the demo's loader is never the bottleneck.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None, cache: bool = False):
        self.images = np.ascontiguousarray(images)
        self.labels = [int(y) for y in labels]
        self.transform = transform
        self._cache: torch.Tensor | None = None
        if cache and transform is not None and len(self) > 0:
            first = transform(Image.fromarray(self.images[0]))
            if first.numel() * first.element_size() * len(self) <= CACHE_LIMIT_BYTES:
                self._cache = torch.stack([first] + [self._transform(i) for i in range(1, len(self))])

    def __len__(self) -> int:
        return len(self.labels)

    def _transform(self, index: int):
        img = Image.fromarray(self.images[index])
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, index: int):
        if self._cache is not None:
            return self._cache[index], self.labels[index]
        return self._transform(index), self.labels[index]


def load_digits_arrays(img_size: int | tuple[int, int], interpolation: str = "bicubic"):
    """scikit-learn's 1,797 8x8 digits, resized once to ``img_size`` as 3-channel uint8.

    Returns ``(train_images, train_labels, val_images, val_labels, mean, std)``; the split is
    stratified 80/20 with seed ``DIGITS_SPLIT_SEED``, mean/std are the train split's pixel
    statistics on the 0..1 scale (the same for all three channels: digits are grey).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0)  # values 0..16 -> 0..1
    y = digits.target.astype(np.int64)
    idx_train, idx_val = train_test_split(
        np.arange(len(y)), test_size=DIGITS_VAL_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
    big = torch.nn.functional.interpolate(x[:, None], size=size, mode=mode,
                                          **({} if mode == "nearest" else {"align_corners": False}))
    big = big.clamp_(0, 1).mul_(255).round_().to(torch.uint8)[:, 0]
    rgb = big[..., None].expand(-1, -1, -1, 3).numpy()
    train_px = x[idx_train]
    mean = (float(train_px.mean()),) * 3
    std = (float(train_px.std()),) * 3
    return rgb[idx_train], y[idx_train], rgb[idx_val], y[idx_val], mean, std


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR file holds (dicts, lists, bytes, numpy arrays): never code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise T2TViTError(f"cannot read CIFAR file {path}: {e.strerror or e}.") from e
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure is a bad file, never a crash
        raise T2TViTError(f"{path} is not a valid CIFAR pickle file ({e}).") from e
    if not isinstance(obj, dict):
        raise T2TViTError(f"{path} is not a valid CIFAR pickle file (expected a dict).")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(meta: dict, key: str, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, (list, tuple, np.ndarray)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise T2TViTError(f"{path} is not a valid CIFAR meta file ('{key}' must be a list of class names as text).")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


def _int_array(value, what: str, path: Path) -> np.ndarray:
    """An integer array (uint8 pixels or labels); strings, objects, floats and booleans are refused."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise T2TViTError(f"{path} is not a valid CIFAR batch ({what}: {err}).") from err
    if array.dtype.kind not in "iu":
        raise T2TViTError(f"{path} is not a valid CIFAR batch ({what} must be integers, found {array.dtype} values).")
    return array


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise T2TViTError(f"{path} is not a valid CIFAR batch (needs 'data' and '{label_key}').")
    x = _int_array(d["data"], "pixel data", path)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise T2TViTError(f"{path} holds data of shape {x.shape}, expected (N, 3072).")
    if x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise T2TViTError(f"{path} is not a valid CIFAR batch (pixel values outside 0..255).")
        x = x.astype(np.uint8)
    y = _int_array(d[label_key], "labels", path).astype(np.int64)
    if y.ndim != 1 or len(y) != len(x):
        raise T2TViTError(f"{path} has {len(x)} images but labels of shape {y.shape}.")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def find_cifar_root(root: Path) -> tuple[str, Path] | None:
    """``("cifar10"|"cifar100", folder)`` if ``root`` is (or directly holds) a CIFAR pickle folder."""
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (folder / "batches.meta").is_file() and (folder / "data_batch_1").is_file():
            return "cifar10", folder
        if (folder / "meta").is_file() and (folder / "train").is_file() and (folder / "test").is_file():
            return "cifar100", folder
    return None


def load_cifar_arrays(kind: str, folder: Path):
    """Read a CIFAR-10/100 folder: ``(train_x, train_y, val_x, val_y, class_names)``, images NHWC uint8."""
    if kind == "cifar10":
        names = _names(_unpickle(folder / "batches.meta"), "label_names", folder / "batches.meta")
        batches = sorted(folder.glob("data_batch_*"), key=lambda p: p.name)
        parts = [_batch_arrays(p, "labels") for p in batches]
        train_x = np.concatenate([p[0] for p in parts])
        train_y = np.concatenate([p[1] for p in parts])
        val_x, val_y = _batch_arrays(folder / "test_batch", "labels")
    else:
        names = _names(_unpickle(folder / "meta"), "fine_label_names", folder / "meta")
        train_x, train_y = _batch_arrays(folder / "train", "fine_labels")
        val_x, val_y = _batch_arrays(folder / "test", "fine_labels")
    for y, split in ((train_y, "train"), (val_y, "test")):
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise T2TViTError(f"CIFAR {split} labels in {folder} fall outside the {len(names)} class names.")
    return train_x, train_y, val_x, val_y, names


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std on the 0..1 scale of NHWC uint8 images, from 256-bin histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[-1]):
        channel = torch.from_numpy(np.ascontiguousarray(images[..., c])).reshape(-1)
        hist = torch.bincount(channel, minlength=256).double().numpy()  # counts uint8 as is (timings: docs/data.md)
        p = hist / max(1.0, hist.sum())
        m = float(p @ values)
        mean.append(m)
        std.append(float(np.sqrt(max(p @ (values * values) - m * m, 1e-12))))
    return tuple(mean), tuple(std)

"""Data sets for training and evaluation: the digits demo, CIFAR-10/100 pickles, ImageFolder trees,
Hugging Face datasets and WebDataset shards.

``create_datasets`` is the one entry point; it returns a :class:`DataBundle` whose ``train`` and
``val`` yield ``(normalised float CHW tensor, int label)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from t2t_vit.data.arrays import ArrayDataset, channel_stats, find_cifar_root, load_cifar_arrays, load_digits_arrays
from t2t_vit.data.transforms import AUGMENT_KEYS, build_transforms, default_augment
from t2t_vit.errors import T2TViTError

BUILTIN = ("digits", "photos")  # data sets that ship with installed packages: no path needed

__all__ = ["AUGMENT_KEYS", "DataBundle", "available_cores", "create_datasets", "default_augment", "resolve_workers"]

MAX_DEFAULT_WORKERS = 8


@dataclass
class DataBundle:
    """Everything a training or evaluation run needs to know about its data."""

    train: Dataset
    val: Dataset
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str = "imagefolder"  # "digits" | "photos" | "cifar10" | "cifar100" | "imagefolder" | "hfds" | "wds"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of every unused file
    train_transform: Callable | None = None
    val_transform: Callable | None = None
    augment: dict[str, Any] | None = None  # the resolved timm options, None for --no-augment
    crop_pct: float = 1.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _stats(mean, std, default_mean, default_std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(float(m) for m in (default_mean if mean is None else mean))
    std = tuple(float(s) for s in (default_std if std is None else std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise T2TViTError(f"mean and std need 3 values each with std > 0, got mean={mean} std={std}.")
    return mean, std


def create_datasets(
    data: str,
    img_size: int | tuple[int, int],
    augment: dict[str, Any] | None,
    crop_pct: float | None = None,
    interpolation: str = "bicubic",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    verify: str = "header",
) -> DataBundle:
    """Build the train and validation data sets.

    Args:
        data: ``"digits"`` (scikit-learn's handwritten digits, no download); a folder with
            ``train/`` and ``val/`` of class folders (ImageFolder); a CIFAR-10/100 python-pickle
            folder (``cifar-10-batches-py`` / ``cifar-100-python`` or a folder holding one);
            ``hfds/<folder or name>`` (Hugging Face datasets) or ``wds/<folder or shard pattern>``
            (WebDataset tar shards), read as in ``data/readers.py``.
        img_size: model input size, int or (height, width).
        augment: timm ``create_transform`` training options (see ``AUGMENT_KEYS``) merged over the
            data set's defaults; ``None`` uses the deterministic eval transform for training too.
        crop_pct: eval centre-crop fraction; ``None`` picks 0.9 for ImageFolder, 1.0 otherwise.
        interpolation: eval resize interpolation.
        mean, std: normalisation; ``None`` picks ImageNet's for ImageFolder and the data set's own
            statistics for digits and CIFAR.
        verify: ImageFolder scan check: ``"header"`` (default: header + end marker, no decode),
            ``"full"`` (decode every image at start; small sets) or ``"none"`` (list files only;
            bad files are then caught when loaded).

    Raises:
        T2TViTError: a missing path, an unknown layout, no usable images, or train/val class lists
            that disagree.
    """
    common = dict(img_size=img_size, augment=augment, crop_pct=crop_pct, interpolation=interpolation)
    if str(data).lower() == "digits":
        tx, ty, vx, vy, dmean, dstd = load_digits_arrays(img_size, interpolation)
        mean, std = _stats(mean, std, dmean, dstd)
        return _array_bundle("digits", tx, ty, vx, vy, [str(i) for i in range(10)], mean, std, **common)
    if str(data).lower() == "photos":
        return _photos_bundle(mean, std, **common)
    from t2t_vit.data.readers import create_reader_sets, is_reader_spec

    if is_reader_spec(data):  # Hugging Face datasets / WebDataset shards: treated as an ImageFolder
        return _imagefolder_like(str(data).split("/")[0], lambda t, e: (*create_reader_sets(data, t, e), []),
                                 mean, std, **common)
    root = _existing_folder(data)
    cifar = find_cifar_root(root)
    if cifar is not None:
        kind, folder = cifar
        tx, ty, vx, vy, names = load_cifar_arrays(kind, folder)
        if mean is None or std is None:
            cmean, cstd = channel_stats(tx)
            mean, std = (cmean if mean is None else mean), (cstd if std is None else std)
        mean, std = _stats(mean, std, None, None)
        return _array_bundle(kind, tx, ty, vx, vy, names, mean, std, **common)
    from t2t_vit.data.folder import create_imagefolder

    return _imagefolder_like("imagefolder", lambda t, e: create_imagefolder(root, t, e, verify), mean, std, **common)


def _existing_folder(data: str) -> Path:
    root = Path(data).expanduser()
    if not root.exists():
        raise T2TViTError(f"data path {root} does not exist "
                          "(expected 'digits', an ImageFolder root or a CIFAR folder).")
    if not root.is_dir():
        raise T2TViTError(f"data path {root} is not a folder.")
    return root


def _imagefolder_like(kind: str, make_sets: Callable, mean, std, img_size, augment, crop_pct,
                      interpolation) -> DataBundle:
    """An ImageFolder tree, Hugging Face data set or WebDataset shards: ImageNet statistics unless
    given and the ImageFolder transforms; ``make_sets(train_tf, eval_tf)`` gives
    ``(train, val, class names, skipped files)``."""
    mean, std = _stats(mean, std, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    train_tf, eval_tf, opts, crop = build_transforms("imagefolder", img_size, augment, crop_pct, interpolation,
                                                     mean, std)
    train, val, names, skipped = make_sets(train_tf, eval_tf)
    return DataBundle(train, val, names, mean, std, kind, skipped, train_tf, eval_tf, opts, crop)


def _photos_bundle(mean, std, **common) -> DataBundle:
    """10 classes of crops of scikit-image's photographs (data/photos.py), full-frame at eval."""
    from t2t_vit.data.photos import photo_arrays

    tx, ty, vx, vy, names = photo_arrays()
    common["crop_pct"] = 1.0 if common["crop_pct"] is None else common["crop_pct"]
    return _array_bundle("photos", tx, ty, vx, vy, names, *_stats(mean, std, *channel_stats(tx)), **common)


def _array_bundle(kind, tx, ty, vx, vy, names, mean, std, *, img_size, augment, crop_pct, interpolation):
    family = "cifar" if kind.startswith("cifar") else kind
    train_tf, eval_tf, opts, crop = build_transforms(family, img_size, augment, crop_pct, interpolation, mean, std)
    train = ArrayDataset(tx, ty, train_tf, cache=opts is None)
    val = ArrayDataset(vx, vy, eval_tf, cache=True)
    return DataBundle(train, val, list(names), mean, std, kind, [], train_tf, eval_tf, opts, crop)


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_workers(bundle: DataBundle, training: bool) -> int:
    """Loader processes when none are asked for (the rule and its measurements: docs/data.md).

    In-memory sets whose samples are pre-computed tensors (digits and CIFAR evaluation, or training
    without augmentation) are a tensor lookup: a worker adds only start-up and inter-process copies,
    so 0. Sets that decode or augment per sample get one process per CPU beyond the one running the
    model, at most ``MAX_DEFAULT_WORKERS``.
    """
    cached = bundle.kind not in ("imagefolder", "hfds", "wds") and (not training or bundle.augment is None)
    if cached:
        return 0
    return min(MAX_DEFAULT_WORKERS, available_cores() - 1)


def resolve_workers(requested: int | None, bundle: DataBundle, training: bool) -> tuple[int, str]:
    """``(workers, note)``: the request (or :func:`default_workers`) capped at the CPU count, which
    is also where torch starts warning; ``note`` says what was capped, else is empty."""
    cores = available_cores()
    if requested is None:
        return default_workers(bundle, training), ""
    if requested > cores:
        return cores, f"{requested} loader workers asked for, this machine has {cores} CPU(s): using {cores}"
    return requested, ""

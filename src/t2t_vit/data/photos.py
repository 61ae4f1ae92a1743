"""A small real-image data set built offline from the photographs scikit-image ships.

Ten classes, one per photograph (``PHOTOS``); each sample is a square crop of 32-64 px resized to
32 px, and the label says which photograph it came from. Every photograph is first scaled so its
shorter side is ``BASE_SIDE`` px, then split by columns: training crops come from the left
``TRAIN_FRACTION`` of the width, validation crops from the rest, so no validation pixel was ever
seen in training. Near-uniform crops (pixel std below ``MIN_STD``: black sky, background) are
redrawn, so every crop holds some structure. The set is deterministic (``SPLIT_SEED``) and needs no
network: 1,500 training and 500 validation images, ~6 MB as uint8 arrays.

``photo_arrays()`` returns the arrays (``create_datasets("photos", ...)`` uses them);
``write_photo_folder(root)`` writes the same images as an ImageFolder tree of PNG files.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
          "motorcycle", "retina", "rocket")
BASE_SIDE = 256
TRAIN_FRACTION = 0.7
CROP_RANGE = (32, 64)
SIZE = 32
TRAIN_PER_CLASS = 150
VAL_PER_CLASS = 50
MIN_STD = 12.0
SPLIT_SEED = 0


def _photograph(name: str) -> np.ndarray:
    """One scikit-image sample photograph as RGB uint8 (grey ones repeated over 3 channels)."""
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    image = np.asarray(image, dtype=np.uint8)
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def _scaled(image: np.ndarray) -> Image.Image:
    h, w = image.shape[:2]
    scale = BASE_SIDE / min(h, w)
    return Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)


def _crops(photo: Image.Image, x_range: tuple[int, int], count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` random square crops whose columns lie in ``x_range``, resized to SIZE px."""
    out: list[np.ndarray] = []
    x0, x1 = x_range
    while len(out) < count:
        side = int(rng.integers(CROP_RANGE[0], min(CROP_RANGE[1], x1 - x0) + 1))
        left = int(rng.integers(x0, x1 - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        pixels = np.asarray(crop, dtype=np.uint8)
        if pixels.std() >= MIN_STD:
            out.append(pixels)
    return out


def photo_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(train_x, train_y, val_x, val_y, class_names)``; images NHWC uint8 at 32 px (fresh copies)."""
    tx, ty, vx, vy = (a.copy() for a in _build())
    return tx, ty, vx, vy, list(PHOTOS)


@functools.lru_cache(maxsize=1)
def _build() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "val": ([], [])}
    for label, name in enumerate(PHOTOS):
        photo = _scaled(_photograph(name))
        cut = int(photo.width * TRAIN_FRACTION)
        for split, x_range, count in (("train", (0, cut), TRAIN_PER_CLASS), ("val", (cut, photo.width), VAL_PER_CLASS)):
            crops = _crops(photo, x_range, count, rng)
            splits[split][0].extend(crops)
            splits[split][1].extend([label] * len(crops))
    (tx, ty), (vx, vy) = ((np.stack(x), np.asarray(y, dtype=np.int64)) for x, y in splits.values())
    return tx, ty, vx, vy


def write_photo_folder(root: str | Path) -> Path:
    """Write the set as ``root/{train,val}/<photo>/<index>.png`` (an ImageFolder tree); returns root."""
    root = Path(root)
    tx, ty, vx, vy, names = photo_arrays()
    for split, images, labels in (("train", tx, ty), ("val", vx, vy)):
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:04d}.png")
    return root

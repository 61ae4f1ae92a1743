"""Image sets in the formats ImageNet copies come in: Hugging Face datasets and WebDataset tar shards.

``--data hfds/<folder or hub name>``: a ``Dataset.save_to_disk`` folder, a folder of parquet files
(``train-*.parquet`` / ``validation-*.parquet``, the Hub's layout, also under ``data/``), or a Hub
name already in the local Hugging Face cache. ``--data wds/<folder or shard pattern>``: WebDataset
tar shards (``<key>.jpg|png|webp`` + ``<key>.cls``), named as timm's ``wds/`` reader expects: a
folder with ``_info.json`` (``splits.<split>.filenames`` and ``num_samples``) or with
``train-*.tar`` and ``val-*.tar`` / ``validation-*.tar``; or a train pattern such as
``/data/in1k/imagenet-train-{000000..001281}.tar`` (optionally ``|1281167``, the sample count to
check) whose validation shards are the files matching it with ``train`` → ``validation`` (or
``val``) and any number in place of the ``{..}`` range.

Both give map-style data sets (random access: WebDataset shards are indexed once, member offsets
read from the tar headers), so they share everything with ImageFolder: the sampler that gives each
rank a disjoint share of every epoch, resumption inside an epoch, per-sample seeded augmentation,
the transforms and the replacement of undecodable images. Class names come from the HF
``ClassLabel`` feature, or ``classes.txt`` (one name a line) next to the shards, else ``"0".."N-1"``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from typing import Any, Callable

from t2t_vit.data.folder import ImageFolderDataset
from t2t_vit.errors import T2TViTError, require

PREFIXES = ("hfds/", "wds/")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
LABEL_EXTS = ("cls", "label", "cls.txt")
SPLITS = {"train": ("train",), "val": ("validation", "val")}


def is_reader_spec(data: str) -> bool:
    return str(data).startswith(PREFIXES)


def create_reader_sets(data: str, train_tf: Callable | None, eval_tf: Callable | None):
    """``(train, val, class_names)`` for an ``hfds/`` or ``wds/`` spec; samples are ``(image, label)``
    with the transform applied, like :class:`ImageFolderDataset`."""
    kind, _, where = str(data).partition("/")
    if not where:
        raise T2TViTError(f"--data {data}: name the data after '{kind}/', e.g. {kind}/path/to/data")
    if kind == "hfds":
        return _hf_sets(where, train_tf, eval_tf)
    return _wds_sets(where, train_tf, eval_tf)


# ---- Hugging Face datasets ------------------------------------------------------------------------------
class HFImages(ImageFolderDataset):
    """Rows of a ``datasets.Dataset``; the image column is read undecoded and decoded as files are."""

    def __init__(self, table: Any, image_key: str, labels: list[int], classes: list[str], transform) -> None:
        self.table, self.image_key = table, image_key
        super().__init__([(i, label) for i, label in enumerate(labels)], classes, transform)

    def open(self, index: int):
        import io

        cell = self.table[index][self.image_key]
        return io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]


def _hf_sets(where: str, train_tf, eval_tf):
    datasets = require("datasets", "formats", "--data hfds/")
    splits = _hf_load(datasets, os.path.expanduser(where))
    chosen = {name: _pick_split(splits, name, f"hfds/{where}") for name in SPLITS}
    table = chosen["train"]
    image_key = next((k for k, f in table.features.items() if isinstance(f, datasets.Image)), None)
    label_key = next((k for k, f in table.features.items() if isinstance(f, datasets.ClassLabel)),
                     "label" if "label" in table.features else None)
    if image_key is None or label_key is None:
        raise T2TViTError(f"hfds/{where} needs an Image column and a label column (ClassLabel or 'label'); "
                          f"it has {', '.join(table.features)}")
    feature = table.features[label_key]
    labels = {name: [int(v) for v in split[label_key]] for name, split in chosen.items()}
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else _numbered(labels)
    sets = {}
    for (name, split), tf in zip(chosen.items(), (train_tf, eval_tf)):
        split = split.cast_column(image_key, datasets.Image(decode=False))  # bytes: decoded by our reader
        sets[name] = HFImages(split, image_key, labels[name], names, tf)
    return sets["train"], sets["val"], names


def _hf_load(datasets, where: str) -> dict[str, Any]:
    """The splits of a ``save_to_disk`` folder, a parquet folder or a cached Hub data set."""
    if os.path.isdir(where):
        if any(os.path.isfile(os.path.join(where, f)) for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(where)
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        files = {}
        for name in ("train", "validation", "val", "test"):
            found = sorted(glob.glob(os.path.join(where, "**", f"{name}[-_.]*parquet"), recursive=True))
            if found:
                files[name] = found
        if not files:
            raise T2TViTError(f"hfds/{where} holds neither a save_to_disk data set (dataset_dict.json) nor "
                              "parquet files named train-*.parquet / validation-*.parquet")
        return dict(datasets.load_dataset("parquet", data_files=files))
    try:
        return dict(datasets.load_dataset(where))
    except Exception as err:  # noqa: BLE001 - offline, unknown name, bad files: one line
        raise T2TViTError(f"hfds/{where} is not a local folder and cannot be loaded as a Hugging Face data set "
                          f"({' '.join(str(err).split())[:200]})") from err


def _pick_split(splits: dict[str, Any], name: str, spec: str):
    for candidate in SPLITS[name]:
        if candidate in splits:
            return splits[candidate]
    raise T2TViTError(f"{spec} has no {' or '.join(SPLITS[name])} split (it has {', '.join(splits) or 'none'})")


def _numbered(labels: dict[str, list[int]]) -> list[str]:
    top = max((max(v) for v in labels.values() if v), default=-1)
    return [str(i) for i in range(top + 1)]


# ---- WebDataset shards --------------------------------------------------------------------------------
class ShardImages(ImageFolderDataset):
    """Samples of WebDataset tar shards, read at their byte offsets (indexed once by :func:`index_shards`)."""

    def open(self, where: tuple[str, int, int]):
        import io

        path, offset, size = where
        with open(path, "rb") as f:
            f.seek(offset)
            return io.BytesIO(f.read(size))


def _wds_sets(where: str, train_tf, eval_tf):
    shards, counts, folder = _wds_splits(os.path.expanduser(where))
    samples = {name: cached_index(files, f"wds/{where}") for name, files in shards.items()}
    for name, expected in counts.items():
        if expected is not None and expected != len(samples[name]):
            raise T2TViTError(f"wds/{where}: the {name} split should have {expected} samples (_info.json or "
                              f"'|count'), its shards hold {len(samples[name])}")
    classes_file = os.path.join(folder, "classes.txt")
    if os.path.isfile(classes_file):
        with open(classes_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = _numbered({k: [label for _, label in v] for k, v in samples.items()})
    for name, rows in samples.items():
        bad = next((label for _, label in rows if not 0 <= label < len(names)), None)
        if bad is not None:
            raise T2TViTError(f"wds/{where}: the {name} split has label {bad}, outside 0..{len(names) - 1}")
    return ShardImages(samples["train"], names, train_tf), ShardImages(samples["val"], names, eval_tf), names


def _wds_splits(where: str) -> tuple[dict[str, list[str]], dict[str, int | None], str]:
    """Shard files and expected sample counts (None: unknown) of the train and val splits."""
    if os.path.isdir(where):
        info = _read_info(where)
        shards, counts = {}, {}
        for name, aliases in SPLITS.items():
            entry = next((info["splits"][a] for a in aliases if a in info.get("splits", {})), None)
            if entry is not None:
                shards[name] = [os.path.join(where, f) for f in entry["filenames"]]
                counts[name] = entry.get("num_samples")
            else:
                shards[name] = next((found for a in aliases if (found := sorted(
                    glob.glob(os.path.join(where, f"{a}-*.tar")) + glob.glob(os.path.join(where, a, "*.tar"))))), [])
                counts[name] = None
        folder = where
    else:  # a train pattern, optionally with its sample count: data-train-{000..009}.tar|12000
        pattern, _, count = where.partition("|")
        if count and not count.isdigit():
            raise T2TViTError(f"wds/{where}: the sample count after '|' must be a whole number, got {count!r}")
        loose = re.sub(r"\{\d+\.\.\d+\}", "*", pattern)  # validation shards are numbered on their own
        vals = [expand_pattern(loose.replace("train", a)) for a in SPLITS["val"] if "train" in pattern]
        shards = dict(train=expand_pattern(pattern), val=next((v for v in vals if v), []))
        counts, folder = dict(train=int(count) if count else None, val=None), os.path.dirname(pattern)
    for name, files in shards.items():
        missing = [f for f in files if not os.path.isfile(f)]
        if not files or missing:
            what = f"shard {missing[0]} does not exist" if missing else f"no {name} shards found"
            raise T2TViTError(f"wds/{where}: {what} (expected a folder with _info.json or train-*.tar and "
                              "val-*.tar, or a train shard pattern such as data-train-{000..009}.tar)")
    return shards, counts, folder


def _read_info(folder: str) -> dict[str, Any]:
    for name in ("_info.json", "info.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, ValueError) as err:
                raise T2TViTError(f"cannot read {path}: {err}") from err
    return {}


def expand_pattern(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → the 3 names (zero-padded as written); ``*`` globs; else the name itself."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        return [pattern[: match.start()] + str(i).zfill(width) + pattern[match.end():]
                for i in range(int(first), int(last) + 1)]
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(pattern))
    return [pattern] if os.path.isfile(pattern) else []


def cached_index(files: list[str], spec: str) -> list[tuple[tuple[str, int, int], int]]:
    """:func:`index_shards`, kept in ``$T2T_VIT_CACHE`` (default ``~/.cache/t2t-vit``) under a key of
    the shards' paths, sizes and modification times: scanning ImageNet's 1.28M samples takes a
    minute or two per process, and a preempted run restarts often."""
    import hashlib

    from t2t_vit.storage import atomic_write

    try:
        stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    except OSError:
        return index_shards(files, spec)  # a missing shard: index_shards names it
    key = hashlib.sha1(json.dumps(stats).encode()).hexdigest()
    folder = os.path.join(os.environ.get("T2T_VIT_CACHE", os.path.expanduser("~/.cache/t2t-vit")), "wds-index")
    path = os.path.join(folder, f"{key}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return [((shard, int(offset), int(size)), int(label)) for (shard, offset, size), label in json.load(f)]
    except (OSError, ValueError, TypeError):
        pass  # not cached yet (or unreadable): scan
    rows = index_shards(files, spec)
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write(path, json.dumps(rows).encode())
    except (OSError, T2TViTError):
        pass  # an unwritable cache only means the next start scans again
    return rows


def index_shards(files: list[str], spec: str) -> list[tuple[tuple[str, int, int], int]]:
    """``((shard, offset, size) of the image, label)`` for every sample, in shard order.

    A sample is every member sharing a key (the name up to the first dot of its file name), as in
    WebDataset; a sample without an image or a label is an error naming it.
    """
    rows = []
    for path in files:
        try:
            with tarfile.open(path, "r:") as tar:
                groups: dict[str, dict[str, Any]] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    key, _, ext = base.partition(".")
                    entry = groups.setdefault(os.path.join(folder, key), {})
                    if ext.lower() in IMAGE_EXTS:
                        entry["image"] = (path, member.offset_data, member.size)
                    elif ext.lower() in LABEL_EXTS:
                        entry["label"] = int(tar.extractfile(member).read().decode().strip())
        except (OSError, tarfile.TarError, ValueError) as err:
            raise T2TViTError(f"{spec}: cannot read shard {path} ({err})") from err
        for key, entry in groups.items():
            if "image" not in entry or "label" not in entry:
                raise T2TViTError(f"{spec}: sample {key} in {path} has no "
                                  f"{'image' if 'image' not in entry else 'label (.cls)'}")
            rows.append((entry["image"], entry["label"]))
    return rows

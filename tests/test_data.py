"""Data layer: digits demo split, CIFAR pickle folders, robust ImageFolder scanning and loading."""
from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2t_vit.data import create_datasets, default_augment
from t2t_vit.data.folder import check_image, load_image
from t2t_vit.errors import T2TViTError

torch.set_num_threads(1)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return create_datasets("digits", 32, None)


def test_digits_split_sizes_shapes_and_determinism(digits):
    again = create_datasets("digits", 32, None)
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    assert digits.num_classes == 10 and digits.class_names == [str(i) for i in range(10)]
    x, y = digits.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey digits as 3 equal channels
    assert digits.train.labels == again.train.labels and digits.val.labels == again.val.labels
    assert torch.equal(digits.val[17][0], again.val[17][0])
    # normalised with the train split's own statistics: the train pixels have mean 0, std 1
    xs = torch.stack([digits.train[i][0] for i in range(len(digits.train))])
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.1


def test_digits_split_is_stratified_and_disjoint(digits):
    from sklearn.datasets import load_digits

    total = Counter(load_digits().target.tolist())
    val = Counter(digits.val.labels)
    train = Counter(digits.train.labels)
    for c, n in total.items():
        assert train[c] + val[c] == n
        assert abs(val[c] - 0.2 * n) <= 1
    # no image of val is also in train (the split is of indices, not a resampling)
    tr = {bytes(im) for im in digits.train.images}
    assert not any(bytes(im) in tr for im in digits.val.images[:50])


def test_digits_labels_match_images(digits):
    """Each val image, pooled back to 8x8, is nearest to an original digit with its own label."""
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = torch.from_numpy(d.images).float().reshape(len(d.images), -1) / 16
    mean, std = digits.mean[0], digits.std[0]
    x = torch.stack([digits.val[i][0][0] for i in range(len(digits.val))]) * std + mean
    small = torch.nn.functional.avg_pool2d(x[:, None], 4).reshape(len(x), -1)
    nearest = torch.cdist(small, raw).argmin(1)
    agree = (torch.from_numpy(d.target)[nearest] == torch.tensor(digits.val.labels)).float().mean()
    assert agree > 0.97


def test_digits_augment_defaults_never_flip_and_are_random():
    b = create_datasets("digits", 32, {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25})
    assert b.augment["hflip"] == 0.0 and b.augment["vflip"] == 0.0 and b.augment["interpolation"] == "random"
    torch.manual_seed(0)
    a1, a2 = b.train[3][0], b.train[3][0]
    assert a1.shape == (3, 32, 32) and not torch.equal(a1, a2)
    assert torch.equal(b.val[3][0], b.val[3][0])  # eval stays deterministic
    assert create_datasets("digits", 32, {"hflip": 0.5}).augment["hflip"] == 0.5  # explicit wins
    assert default_augment("digits")["hflip"] == 0.0


def test_no_augment_is_deterministic_eval_transform(digits):
    assert digits.augment is None and digits.train_transform is digits.val_transform
    assert torch.equal(digits.train[0][0], digits.train[0][0])


def test_unknown_augment_key_is_refused():
    with pytest.raises(T2TViTError, match="hflp.*valid: .*hflip"):
        create_datasets("digits", 32, {"hflp": 0.0})
    with pytest.raises(T2TViTError, match="unknown interpolation 'cubic'"):
        create_datasets("digits", 32, None, interpolation="cubic")
    with pytest.raises(T2TViTError, match="crop_pct must be in"):
        create_datasets("digits", 32, None, crop_pct=1.5)


def test_non_square_img_size():
    b = create_datasets("digits", (24, 40), default_augment("digits"))
    assert b.val[0][0].shape == (3, 24, 40) and b.train[0][0].shape == (3, 24, 40)


# ---------------------------------------------------------------- CIFAR


def _cifar_images(labels, start):
    """Images whose R plane encodes the label, G the running index, B a constant: checks CHW order."""
    n = len(labels)
    x = np.zeros((n, 3, 32, 32), np.uint8)
    x[:, 0] = (np.asarray(labels) * 7)[:, None, None]
    x[:, 1] = ((start + np.arange(n)) % 256)[:, None, None]
    x[:, 2] = 200
    return x.reshape(n, 3072)


def _dump(path: Path, obj, protocol=2):
    # the real files were written by Python 2 / numpy 1: arrays refer to numpy.core.multiarray
    path.write_bytes(pickle.dumps(obj, protocol=protocol).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


@pytest.fixture()
def cifar10(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(root / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        labels = rng.integers(0, 10, 4).tolist()
        _dump(root / f"data_batch_{i}", {b"batch_label": b"x", b"labels": labels,
                                         b"data": _cifar_images(labels, 4 * (i - 1)), b"filenames": [b"f"] * 4},
              protocol=2 if i % 2 else 5)
    labels = [9, 0, 3]
    _dump(root / "test_batch", {b"labels": labels, b"data": _cifar_images(labels, 0)})
    return tmp_path, names


def _unnormalise(b, x):
    return x * torch.tensor(b.std)[:, None, None] + torch.tensor(b.mean)[:, None, None]


def test_cifar10_folder_labels_names_and_pixels(cifar10):
    parent, names = cifar10
    b = create_datasets(str(parent), 32, None)  # the parent folder is found too
    assert b.kind == "cifar10" and b.class_names == names and b.num_classes == 10
    assert (len(b.train), len(b.val)) == (20, 3)
    assert b.val.labels == [9, 0, 3]
    for i in range(20):
        x, y = b.train[i]
        px = (_unnormalise(b, x) * 255).round()
        assert [px[c].unique().tolist() for c in range(3)] == [[y * 7], [i], [200]]
    # dataset statistics: B is constant 200/255
    assert b.mean[2] == pytest.approx(200 / 255, abs=1e-6)
    big = create_datasets(str(parent / "cifar-10-batches-py"), 48, None)
    assert big.val[0][0].shape == (3, 48, 48)


def test_cifar100_folder(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    fine = [f"class{i:02d}" for i in range(100)]
    _dump(root / "meta", {b"fine_label_names": [n.encode() for n in fine], b"coarse_label_names": [b"c"] * 20})
    tr, te = [5, 99, 0, 42], [7, 7]
    _dump(root / "train", {b"fine_labels": tr, b"coarse_labels": [0] * 4, b"data": _cifar_images(tr, 0)})
    _dump(root / "test", {b"fine_labels": te, b"coarse_labels": [0] * 2, b"data": _cifar_images(te, 0)})
    b = create_datasets(str(root), 32, default_augment("cifar"))
    assert b.kind == "cifar100" and b.num_classes == 100 and b.class_names[42] == "class42"
    assert b.train.labels == tr and b.val.labels == te
    assert b.train[1][0].shape == (3, 32, 32) and b.augment["hflip"] == 0.5


def test_cifar_pickle_payload_never_runs(cifar10, tmp_path):
    parent, _ = cifar10
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _dump(parent / "cifar-10-batches-py" / "batches.meta", {b"label_names": Payload()})
    with pytest.raises(T2TViTError, match="batches.meta is not a valid CIFAR pickle.*refusing"):
        create_datasets(str(parent), 32, None)
    assert not marker.exists()


# ---------------------------------------------------------------- ImageFolder


def _save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _rgb(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _good_folder(root: Path, classes=("cat", "dog"), per_class=2):
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                _save(root / split / c / f"{i}.png", _rgb(hash((split, c, i)) % 1000))


@pytest.fixture()
def messy(tmp_path, monkeypatch):
    """A data set holding every kind of bad file next to every kind of valid-but-odd image."""
    root = tmp_path / "messy"
    t = root / "train"
    good = {
        _save(t / "cat" / "rgb.jpg", _rgb(1)),
        _save(t / "cat" / "gray.png", _rgb(2).convert("L")),
        _save(t / "cat" / "cmyk.jpg", _rgb(3).convert("CMYK")),
        _save(t / "dog" / "palette.png", _rgb(4).convert("P"), transparency=0),
        _save(t / "dog" / "sixteen.png", Image.fromarray(np.tile(np.array([0, 25700, 65535], np.uint16), (20, 10)))),
        _save(t / "dog" / "nested" / "UPPER.JPEG", _rgb(5)),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    good.add(_save(t / "dog" / "rotated.jpg", _rgb(6, (40, 20)), exif=exif))
    bad = {
        _truncate(_save(t / "cat" / "truncated.jpg", _rgb(7, (64, 64)), quality=95)): "truncated JPEG",
        _truncate(_save(t / "dog" / "truncated.png", _rgb(8, (64, 64)))): "truncated PNG",
        _save(t / "cat" / "bomb.png", Image.new("1", (10_000, 10_000))): "image too large",
        t / "unreadable" / "x.png": "unreadable",
        t / "empty": "empty class folder",
        t / "stray.jpg": "outside a class folder",
    }
    (t / "cat" / "notes.jpg").write_text("this is not an image")
    bad[t / "cat" / "notes.jpg"] = "not an image"
    (t / "dog" / "zero.png").write_bytes(b"")
    bad[t / "dog" / "zero.png"] = "not an image"
    (t / "empty").mkdir()
    _save(t / "stray.jpg", _rgb(9))
    _save(t / "unreadable" / "x.png", _rgb(10))
    (t / "cat" / "README.txt").write_text("ignored: not an image extension")
    (t / "cat" / ".hidden.jpg").write_text("ignored: hidden")
    # an unreadable class folder: by permissions, and by patching scandir when running as root
    os.chmod(t / "unreadable", 0)
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(t / "unreadable"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    bad[t / "unreadable"] = bad.pop(t / "unreadable" / "x.png")
    for c in ("cat", "dog", "empty", "unreadable"):
        _save(root / "val" / c / "v.png", _rgb(11))
    yield root, {str(p) for p in good}, {str(p): r for p, r in bad.items()}
    os.chmod(t / "unreadable", 0o755)


def test_messy_folder_uses_valid_and_names_each_bad_file_once(messy, caplog):
    root, good, bad = messy
    with caplog.at_level(logging.WARNING, logger="t2t_vit.data"):
        b = create_datasets(str(root), 32, None)
    assert b.class_names == ["cat", "dog", "empty", "unreadable"]
    assert {p for p, _ in b.train.samples} == good
    skipped = dict(b.skipped)
    assert set(skipped) == set(bad)
    for path, expected in bad.items():
        assert expected in skipped[path], (path, skipped[path])
        assert sum(path in r.getMessage() for r in caplog.records) == 1, path
    assert not any("README" in r.getMessage() or ".hidden" in r.getMessage() for r in caplog.records)
    assert any(f"{len(good)} images in 4 classes, {len(bad)} skipped" in r.getMessage() for r in caplog.records)
    # every used image loads as RGB and transforms to the model size: an epoch runs through
    loader = torch.utils.data.DataLoader(b.train, batch_size=4)
    assert sum(len(y) for x, y in loader if x.shape[1:] == (3, 32, 32)) == len(good)


def test_odd_images_convert_correctly(messy):
    root, good, _ = messy
    t = root / "train"
    rot = load_image(str(t / "dog" / "rotated.jpg"))
    assert rot.mode == "RGB" and rot.size == (20, 40)  # EXIF orientation applied
    sixteen = np.asarray(load_image(str(t / "dog" / "sixteen.png")))
    assert sixteen.shape == (20, 30, 3)  # 16-bit greys are scaled to 8 bits, not clipped
    assert sixteen[0, :3, 0].tolist() == [0, 100, 255] and (sixteen[..., 0] == sixteen[..., 2]).all()
    for p in good:
        assert load_image(p).mode == "RGB"
    assert check_image(str(t / "cat" / "truncated.jpg"), verify="full").startswith("unreadable")


def test_load_time_failure_is_replaced_within_class(tmp_path, caplog):
    _good_folder(tmp_path, per_class=3)
    bad = _truncate(_save(tmp_path / "train" / "dog" / "1a.jpg", _rgb(1, (64, 64))))
    b = create_datasets(str(tmp_path), 16, None, verify="none")  # scan does not look inside files
    i = [p for p, _ in b.train.samples].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="t2t_vit.data"):
        x1, y1 = b.train[i]
        x2, y2 = b.train[i]
    assert y1 == y2 == b.class_names.index("dog") and torch.equal(x1, x2) and x1.shape == (3, 16, 16)
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1
    # a file deleted after the scan is handled the same way
    os.remove(b.train.samples[0][0])
    assert b.train[0][1] == b.class_names.index("cat")


def test_eval_transform_respects_img_size_and_crop_pct(tmp_path):
    # a 64x64 image: a white centre square of 44 px on a black border; a crop of half the side
    # (the centre 32 px) is all white, the full image is not
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:54, 10:54] = 255
    for split in ("train", "val"):
        _save(tmp_path / split / "a" / "x.png", Image.fromarray(img))
    centre = create_datasets(str(tmp_path), 16, None, crop_pct=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    assert centre.crop_pct == 0.5
    assert centre.val[0][0].shape == (3, 16, 16) and centre.val[0][0].min() > 0.99
    full = create_datasets(str(tmp_path), (16, 24), None, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    x = full.val[0][0]
    assert x.shape == (3, 16, 24) and x[:, 0, 0].max() < 0.01 and x[:, 8, 12].min() > 0.99
    default = create_datasets(str(tmp_path), 16, None)
    assert default.crop_pct == 0.9 and default.mean == pytest.approx((0.485, 0.456, 0.406))


def test_imagefolder_errors(tmp_path, monkeypatch):
    import t2t_vit.data.folder as folder

    with pytest.raises(T2TViTError, match=str(tmp_path / "nope")):
        create_datasets(str(tmp_path / "nope"), 32, None)
    _good_folder(tmp_path / "a")
    (tmp_path / "a" / "val" / "dog").rename(tmp_path / "a" / "val" / "wolf")
    with monkeypatch.context() as m:  # the class lists are compared before any file is opened
        m.setattr(folder, "check_image", lambda *a: pytest.fail("opened a file before comparing classes"))
        with pytest.raises(T2TViTError, match="disagree.*only in train: dog; only in val: wolf"):
            create_datasets(str(tmp_path / "a"), 32, None)
    _good_folder(tmp_path / "b")
    for p in (tmp_path / "b" / "val").rglob("*.png"):
        p.write_text("broken")
    with pytest.raises(T2TViTError, match="no usable images in .*val"):
        create_datasets(str(tmp_path / "b"), 32, None)
    (tmp_path / "c" / "train" / "x").mkdir(parents=True)
    with pytest.raises(T2TViTError, match="has no val/ folder"):
        create_datasets(str(tmp_path / "c"), 32, None)
    (tmp_path / "d").mkdir()
    with pytest.raises(T2TViTError, match="has no train/ folder"):
        create_datasets(str(tmp_path / "d"), 32, None)


def _posterize_op(magnitude):
    """The PosterizeIncreasing operation of our own RandAugment transform, at a fixed magnitude."""
    from t2t_vit.data.transforms import augment_ops, build_transforms

    train_tf, *_ = build_transforms("imagefolder", 32, dict(auto_augment="rand-m9-mstd0.5-inc1"), None, "bicubic",
                                    (0.5,) * 3, (0.5,) * 3)
    op = next(o for o in augment_ops(train_tf) if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0
    return op


def test_randaugment_posterize_zero_bits_does_not_crash():
    """rand-m9-mstd0.5 reaches magnitude 10 = keep 0 bits, which Pillow >= 11 refuses by itself."""
    img = _rgb(0)
    out = np.asarray(_posterize_op(10)(img))
    assert out.shape == (30, 40, 3) and (out == 0).all()
    four = np.asarray(_posterize_op(0)(img))
    assert (four == (np.asarray(img) & 0xF0)).all()  # level 0 keeps the 4 high bits


def test_importing_data_leaves_timm_ops_alone():
    """The posterize fix lives in our transforms' own operations, not in timm's global table."""
    from timm.data import auto_augment

    import t2t_vit.data  # noqa: F401 - importing it must change nothing in timm

    _posterize_op(10)  # building our RandAugment transform must not either
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        assert auto_augment.NAME_TO_OP[name] is auto_augment.posterize, name
    plain = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=0)
    assert plain.aug_fn is auto_augment.posterize  # timm's own ops stay timm's


def test_worker_processes_survive_bad_files(messy):
    """With verify="none" every bad file reaches the workers; the epoch still completes."""
    root, good, bad = messy
    b = create_datasets(str(root), 16, default_augment("imagefolder"), verify="none")
    n_files = len(b.train)
    assert n_files > len(good)  # the bad files were not filtered at scan
    loader = torch.utils.data.DataLoader(b.train, batch_size=4, num_workers=2)
    labels = [y for _, ys in loader for y in ys.tolist()]
    assert len(labels) == n_files


# ---------------------------------------------------------------- hardening


@pytest.mark.parametrize("change, needle", [
    (dict(labels=["a", "b", "c"]), "labels must be integers"),
    (dict(labels=np.array([1, "x", None], dtype=object)), "labels must be integers"),
    (dict(data=np.array([[None] * 3072] * 3, dtype=object)), "pixel data must be integers"),
    (dict(data=np.full((3, 3072), 1000, np.int64)), "outside 0..255"),
])
def test_malformed_cifar_batch_is_one_line(cifar10, change, needle):
    parent, _ = cifar10
    root = parent / "cifar-10-batches-py"
    batch = {b"labels": [9, 0, 3], b"data": _cifar_images([9, 0, 3], 0)}
    batch.update({k.encode(): v for k, v in change.items()})
    _dump(root / "test_batch", batch)
    with pytest.raises(T2TViTError, match=needle) as info:
        create_datasets(str(parent), 32, None)
    assert len(str(info.value).splitlines()) == 1


def test_cifar_int_label_names_are_refused(cifar10):
    parent, _ = cifar10
    _dump(parent / "cifar-10-batches-py" / "batches.meta", {b"label_names": list(range(10))})
    with pytest.raises(T2TViTError, match="list of class names as text"):
        create_datasets(str(parent), 32, None)


def test_symlink_loop_is_not_followed(tmp_path, caplog):
    """A link back to a parent (a loop) or elsewhere into the tree is skipped and named; each image counts once."""
    root = tmp_path / "tree"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")
    (root / "train" / "a" / "loop").symlink_to(root / "train" / "a")  # a loop
    (root / "train" / "a" / "up").symlink_to(root / "train")  # back into the tree, through b too
    (root / "train" / "b" / "dup.png").symlink_to(root / "train" / "a" / "0.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    (root / "train" / "b" / "extra").symlink_to(outside)  # outside the tree: followed
    with caplog.at_level(logging.WARNING, logger="t2t_vit.data"):
        b = create_datasets(str(root), 8, None)
    assert len(b.train) == 7 and len(b.val) == 6  # 3 + 3 + the outside image
    assert sorted(os.path.basename(p) for p, _ in b.skipped) == ["dup.png", "loop", "up"]
    assert all("not followed" in reason for _, reason in b.skipped)


def test_workers_are_capped_at_the_cpu_count(digits, monkeypatch):
    import t2t_vit.data as data

    monkeypatch.setattr(data, "available_cores", lambda: 2)
    assert data.resolve_workers(8, digits, training=True) == (
        2, "8 loader workers asked for, this machine has 2 CPU(s): using 2")
    assert data.resolve_workers(1, digits, training=True) == (1, "")
    assert data.resolve_workers(None, digits, training=False) == (0, "")  # cached tensors: no workers


def test_capped_workers_do_not_make_torch_warn(digits):
    import warnings

    from t2t_vit.data import resolve_workers

    workers, note = resolve_workers(64, digits, training=True)
    assert note.startswith("64 loader workers asked for")
    loader = torch.utils.data.DataLoader(digits.train, num_workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.check_worker_number_rationality()  # torch's own check, which warns above the CPU count
    with pytest.warns(UserWarning):
        torch.utils.data.DataLoader(digits.train, num_workers=workers + 1).check_worker_number_rationality()

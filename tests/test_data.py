"""Data layer: digits demo split, CIFAR pickle folders, transforms, worker counts (ImageFolder trees:
test_data_folder.py)."""
from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from t2t_vit.data import create_datasets, default_augment
from t2t_vit.errors import T2TViTError
from helpers import rgb

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


def test_our_randaugment_is_timms_own_and_posterizes_to_zero_bits():
    """rand-m9-mstd0.5 reaches magnitude 10 = keep 0 bits; the pinned Pillow accepts it, so our
    training transform holds timm's own, unpatched operation (the RandAugment runs are in
    tests/test_timm_scripts.py)."""
    from timm.data import auto_augment

    from t2t_vit.data.transforms import build_transforms

    train_tf, *_ = build_transforms("imagefolder", 32, dict(auto_augment="rand-m9-mstd0.5-inc1"), None, "bicubic",
                                    (0.5,) * 3, (0.5,) * 3)
    augment = next(t for t in train_tf.transforms if isinstance(t, auto_augment.RandAugment))
    op = next(o for o in augment.ops if o.name == "PosterizeIncreasing")
    assert op.aug_fn is auto_augment.posterize
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    out = np.asarray(op(rgb(0)))
    assert out.shape == (30, 40, 3) and (out == 0).all()


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


def test_a_recipes_random_erasing_is_the_papers_pixel_mode():
    """The trainer passes ``re_prob`` alone; timm's default mode is "const" (zeros), while the
    paper's recipe (DeiT's) erases with per-pixel noise. Found on the ImageNet recipes."""
    from timm.data.random_erasing import RandomErasing

    from t2t_vit.train import TrainConfig
    from t2t_vit.train.recipe import augment_options
    from t2t_vit.data.transforms import build_transforms

    cfg = TrainConfig(re_prob=0.25, augment=True)
    train_tf, *_ = build_transforms("imagefolder", 32, augment_options(cfg), None, "bicubic",
                                    (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    erasers = [t for t in getattr(train_tf, "transforms", []) if isinstance(t, RandomErasing)]
    assert len(erasers) == 1 and erasers[0].mode == "pixel" and erasers[0].probability == 0.25

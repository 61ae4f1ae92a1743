"""ImageFolder trees: bad files named once and skipped, odd images converted, load-time failures
replaced within class, eval crop, clear errors, worker processes, symlink loops."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2t_vit.data import create_datasets, default_augment
from t2t_vit.data.folder import check_image, load_image
from t2t_vit.errors import T2TViTError

from helpers import rgb

torch.set_num_threads(1)


# ---------------------------------------------------------------- ImageFolder


def _save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _good_folder(root: Path, classes=("cat", "dog"), per_class=2):
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                _save(root / split / c / f"{i}.png", rgb(hash((split, c, i)) % 1000))


@pytest.fixture()
def messy(tmp_path, monkeypatch):
    """A data set holding every kind of bad file next to every kind of valid-but-odd image."""
    root = tmp_path / "messy"
    t = root / "train"
    good = {
        _save(t / "cat" / "rgb.jpg", rgb(1)),
        _save(t / "cat" / "gray.png", rgb(2).convert("L")),
        _save(t / "cat" / "cmyk.jpg", rgb(3).convert("CMYK")),
        _save(t / "dog" / "palette.png", rgb(4).convert("P"), transparency=0),
        _save(t / "dog" / "sixteen.png", Image.fromarray(np.tile(np.array([0, 25700, 65535], np.uint16), (20, 10)))),
        _save(t / "dog" / "nested" / "UPPER.JPEG", rgb(5)),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    good.add(_save(t / "dog" / "rotated.jpg", rgb(6, (40, 20)), exif=exif))
    bad = {
        _truncate(_save(t / "cat" / "truncated.jpg", rgb(7, (64, 64)), quality=95)): "truncated JPEG",
        _truncate(_save(t / "dog" / "truncated.png", rgb(8, (64, 64)))): "truncated PNG",
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
    _save(t / "stray.jpg", rgb(9))
    _save(t / "unreadable" / "x.png", rgb(10))
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
        _save(root / "val" / c / "v.png", rgb(11))
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
    bad = _truncate(_save(tmp_path / "train" / "dog" / "1a.jpg", rgb(1, (64, 64))))
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


def test_worker_processes_survive_bad_files(messy):
    """With verify="none" every bad file reaches the workers; the epoch still completes."""
    root, good, bad = messy
    b = create_datasets(str(root), 16, default_augment("imagefolder"), verify="none")
    n_files = len(b.train)
    assert n_files > len(good)  # the bad files were not filtered at scan
    loader = torch.utils.data.DataLoader(b.train, batch_size=4, num_workers=2)
    labels = [y for _, ys in loader for y in ys.tolist()]
    assert len(labels) == n_files


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


def _tree(root: Path, classes=("c0", "c1", "c2"), per_class=4) -> None:
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")


def test_class_folders_linked_into_the_tree_are_not_classes(tmp_path, caplog):
    """Issue 23 item 5: `ln -s c0 train/c3; ln -s . train/c4` made 5 classes and counted images twice."""
    root = tmp_path / "tree"
    _tree(root)
    (root / "train" / "c3").symlink_to("c0")
    (root / "train" / "c4").symlink_to(".")
    outside = tmp_path / "outside"
    _tree(outside, classes=("c0",), per_class=2)
    (root / "train" / "c5").symlink_to(outside / "train" / "c0")  # outside the tree: a real class ...
    (root / "val" / "c5").symlink_to(outside / "val" / "c0")
    (root / "train" / "c6").symlink_to(outside / "train" / "c0")  # ... once: the second link is a copy
    with caplog.at_level(logging.WARNING, logger="t2t_vit.data"):
        b = create_datasets(str(root), 8, None)
    assert b.class_names == ["c0", "c1", "c2", "c5"]
    assert len(b.train) == 3 * 4 + 2 and len(b.val) == 3 * 4 + 2
    assert len({os.path.realpath(p) for p, _ in b.train.samples}) == len(b.train)  # each image once
    named = {os.path.basename(p): reason for p, reason in b.skipped}
    assert set(named) == {"c3", "c4", "c6"} and all("not a class" in r for r in named.values())
    assert "c3" in caplog.text and "c4" in caplog.text


def test_only_regular_files_are_opened(tmp_path, caplog):
    """Issue 23 item 7: a FIFO named zz.png hung the scan (and predict/visualize) forever."""
    root = tmp_path / "tree"
    _tree(root, classes=("a", "b"), per_class=2)
    os.mkfifo(root / "train" / "a" / "zz.png")
    with caplog.at_level(logging.WARNING, logger="t2t_vit.data"):
        b = create_datasets(str(root), 8, None)  # before the fix: blocked in open() forever
    assert len(b.train) == 4
    assert [(os.path.basename(p), r) for p, r in b.skipped] == [("zz.png", "not a regular file (not opened)")]
    with pytest.raises(ValueError, match="not a regular file"):
        load_image(str(root / "train" / "a" / "zz.png"))
    assert check_image(str(root / "train" / "a" / "zz.png")) == "not a regular file (not opened)"

"""--data hfds/ and wds/: the digits written in each format give the ImageFolder samples, train to the
same weights, and split into disjoint per-rank shares under 2 gloo processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

# Parquet loading caches arrow files, wds/ its shard index; keep them out of the user's caches
# (HF_DATASETS_CACHE is read when datasets is imported).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="t2t-hf-cache-"))
os.environ.setdefault("T2T_VIT_CACHE", tempfile.mkdtemp(prefix="t2t-cache-"))

from t2t_vit.data import create_datasets  # noqa: E402
from t2t_vit.errors import T2TViTError  # noqa: E402
from t2t_vit.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from data_formats import write_digits  # noqa: E402

TINY = dict(model="t2t_vit_7", model_kwargs=dict(embed_dim=32, depth=1, num_heads=2, token_dim=16), img_size=32,
            stem="small", workers=0, threads=1, log_every=1000)


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    specs = write_digits(str(root))
    specs["wds (pattern)"] = f"wds/{root}/wds/train-{{000000..000002}}.tar|1437"
    return specs


def test_every_format_gives_the_imagefolder_samples(formats):
    bundles = {kind: create_datasets(data, 32, None) for kind, data in formats.items()}
    folder = bundles.pop("imagefolder")
    for kind, bundle in bundles.items():
        assert bundle.class_names == folder.class_names == [str(c) for c in range(10)], kind
        assert (len(bundle.train), len(bundle.val)) == (len(folder.train), len(folder.val)) == (1437, 360), kind
        assert (bundle.mean, bundle.std, bundle.crop_pct) == (folder.mean, folder.std, folder.crop_pct)
        for split in ("train", "val"):
            ours, theirs = getattr(bundle, split), getattr(folder, split)
            for i in (0, 359, len(ours) - 1):
                (x, y), (x_ref, y_ref) = ours[i], theirs[i]
                assert y == y_ref and torch.equal(x, x_ref), (kind, split, i)
    # a loader worker process reads them too (the data set is pickled into it)
    for kind in ("hfds (parquet)", "wds"):
        labels = torch.cat([y for _, y in DataLoader(bundles[kind].val, batch_size=128, num_workers=1)])
        assert labels.tolist() == [y for _, y in folder.val.samples]


@pytest.mark.e2e
def test_training_through_each_format_ends_with_the_imagefolder_weights(formats, tmp_path):
    # Same samples in the same order, augmentation seeded per (seed, epoch, index): identical runs.
    common = dict(TINY, epochs=1, max_steps=3, batch_size=16, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    weights = {}
    for n, (kind, data) in enumerate(formats.items()):
        train(TrainConfig(**common, data=data, output=str(tmp_path / f"run{n}")))
        weights[kind] = load_file(str(tmp_path / f"run{n}" / "checkpoint-last.safetensors"))
    reference = weights.pop("imagefolder")
    for kind, w in weights.items():
        assert all(torch.equal(w[k], reference[k]) for k in reference), kind


SHARES = r"""
import json, sys, torch, torch.distributed as dist
from torch.utils.data import DataLoader
from t2t_vit.data import create_datasets
from t2t_vit.train.distributed import ShardedSampler, init_world
world = init_world("cpu")
result = {}
for data in sys.argv[2:]:
    bundle = create_datasets(data, 32, None)
    ids = lambda ds, idx: [repr(ds.samples[i][0]) for i in idx]
    mine = {}
    for epoch in (0, 1):
        sampler = ShardedSampler(len(bundle.train), world, 32, seed=0)
        sampler.set_epoch(epoch)
        idx = list(sampler)
        loaded = [int(y) for _, ys in DataLoader(bundle.train, batch_size=32, sampler=idx, num_workers=1) for y in ys]
        assert loaded == [bundle.train.samples[i][1] for i in idx]  # the loader read exactly these samples
        mine[f"train{epoch}"] = ids(bundle.train, idx)
    val = ShardedSampler(len(bundle.val), world, 32, seed=0, shuffle=False, drop_last=False)
    mine["val"] = ids(bundle.val, list(val))
    everyone = [None] * world.size
    dist.all_gather_object(everyone, mine)
    result[data] = everyone
if world.rank == 0:
    json.dump(result, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


@pytest.mark.e2e
def test_two_gloo_ranks_get_disjoint_shares_of_every_epoch(formats, tmp_path):
    script, out = tmp_path / "shares.py", tmp_path / "shares.json"
    script.write_text(SHARES)
    data = [formats["hfds (save_to_disk)"], formats["wds"]]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(out), *data]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for spec, ranks in json.loads(out.read_text()).items():
        for key, total in (("train0", 1437 // 64 * 64), ("train1", 1437 // 64 * 64), ("val", 360)):
            shares = [set(r[key]) for r in ranks]
            assert all(len(s) == len(r[key]) for s, r in zip(shares, ranks)), (spec, key)  # no repeats in a rank
            assert not shares[0] & shares[1], (spec, key)  # disjoint
            assert len(shares[0] | shares[1]) == total, (spec, key)  # all but the trimmed remainder
        assert ranks[0]["train0"] != ranks[0]["train1"]  # reshuffled every epoch


def test_shard_index_is_cached_and_refreshed_when_a_shard_changes(formats, tmp_path, monkeypatch):
    import tarfile

    monkeypatch.setenv("T2T_VIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "wds"
    root.mkdir()
    for f in Path(formats["wds"][len("wds/"):]).iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    first = create_datasets(f"wds/{root}", 32, None)
    assert len(list((tmp_path / "cache" / "wds-index").iterdir())) == 2  # train and val
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    again = create_datasets(f"wds/{root}", 32, None)
    assert opened == [] and again.train.samples == first.train.samples  # read from the cache
    shard = root / "train-000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the shard "changed"
    create_datasets(f"wds/{root}", 32, None)
    assert str(shard) in opened  # scanned again


def test_format_errors_are_one_line(formats, tmp_path, monkeypatch):
    root = Path(formats["wds"][len("wds/"):])
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["train"]["num_samples"] = 1000
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in root.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "_info.json").write_text(json.dumps(info))
    with pytest.raises(T2TViTError, match="train split should have 1000 samples.*hold 1437"):
        create_datasets(f"wds/{bad}", 32, None)
    (bad / "_info.json").unlink()
    (bad / "classes.txt").write_text("a\nb\n")
    with pytest.raises(T2TViTError, match="label 2, outside 0..1"):
        create_datasets(f"wds/{bad}", 32, None)
    for f in bad.glob("val-*"):
        f.unlink()
    with pytest.raises(T2TViTError, match="no val shards found"):
        create_datasets(f"wds/{bad}", 32, None)
    with pytest.raises(T2TViTError, match="neither a save_to_disk data set"):
        create_datasets(f"hfds/{bad}", 32, None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the formats extra were not installed
    with pytest.raises(T2TViTError, match=r"--data hfds/ needs the optional package 'datasets'.*t2t-vit\[formats\]"):
        create_datasets(formats["hfds (parquet)"], 32, None)

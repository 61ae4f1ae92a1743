"""The digits demo through every data format: ImageFolder, HF save_to_disk, HF parquet, WebDataset.

    python benchmarks/data_formats.py --root /tmp/formats --epochs 3     # writes the sets, trains 4×

Writes the digits (32 px PNGs, the demo's split) once in each format, with the samples in the same
order, then trains the demo recipe (configs/digits.yaml) through each with the same seed and prints
val top-1 per format (and for the built-in ``digits`` arrays, which have their own normalisation and
crop, as a reference). ``write_digits`` is also what tests/test_data_formats.py trains on.
"""
from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
from PIL import Image


def digits_samples(img_size: int = 32) -> dict[str, list[tuple[bytes, int]]]:
    """The demo's train/val split as ``(png bytes, label)``, in ImageFolder order (class, then index)."""
    from t2t_vit.data.arrays import load_digits_arrays

    tx, ty, vx, vy, _, _ = load_digits_arrays(img_size)
    out = {}
    for split, (images, labels) in dict(train=(tx, ty), val=(vx, vy)).items():
        order = sorted(range(len(labels)), key=lambda i: (int(labels[i]), i))
        rows = []
        for i in order:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(images[i])).save(buffer, format="PNG")
            rows.append((buffer.getvalue(), int(labels[i])))
        out[split] = rows
    return out


def write_digits(root: str, img_size: int = 32, shards: int = 3) -> dict[str, str]:
    """Write the digits as ImageFolder, HF ``save_to_disk``, HF parquet and WebDataset shards under
    ``root``; returns the ``--data`` value of each."""
    import datasets
    import webdataset as wds

    names = [str(c) for c in range(10)]
    samples = digits_samples(img_size)
    for split, rows in samples.items():  # ImageFolder: zero-padded names keep the order above
        for n, (png, label) in enumerate(rows):
            folder = os.path.join(root, "imagefolder", split, names[label])
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{n:05d}.png"), "wb") as f:
                f.write(png)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    table = datasets.DatasetDict({
        hf_split: datasets.Dataset.from_dict(
            dict(image=[dict(bytes=png, path=None) for png, _ in samples[split]],
                 label=[label for _, label in samples[split]]), features=features)
        for split, hf_split in (("train", "train"), ("val", "validation"))})
    table.save_to_disk(os.path.join(root, "hfds"))
    os.makedirs(os.path.join(root, "parquet", "data"), exist_ok=True)
    for hf_split, part in table.items():
        part.to_parquet(os.path.join(root, "parquet", "data", f"{hf_split}-00000-of-00001.parquet"))
    info = {"name": "digits", "splits": {}}
    for split, rows in samples.items():
        folder = os.path.join(root, "wds")
        os.makedirs(folder, exist_ok=True)
        count = shards if split == "train" else 1
        files, lengths = [], []
        for k, part in enumerate(np.array_split(np.arange(len(rows)), count)):
            name = f"{split}-{k:06d}.tar"
            with wds.TarWriter(os.path.join(folder, name)) as sink:
                for n in part:
                    png, label = rows[n]
                    sink.write({"__key__": f"{n:05d}", "png": png, "cls": label})
            files.append(name)
            lengths.append(len(part))
        info["splits"][split] = dict(name=split, num_samples=len(rows), filenames=files, shard_lengths=lengths)
    with open(os.path.join(root, "wds", "_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(root, "wds", "classes.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    return {"imagefolder": os.path.join(root, "imagefolder"), "hfds (save_to_disk)": "hfds/" + os.path.join(root, "hfds"),
            "hfds (parquet)": "hfds/" + os.path.join(root, "parquet"), "wds": "wds/" + os.path.join(root, "wds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder to write the four copies into")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    from t2t_vit.train import load_config, train

    specs = {"digits (built-in arrays)": "digits", **write_digits(args.root)}
    rows = []
    for kind, data in specs.items():
        out = os.path.join(args.root, "runs", kind.split()[0] + ("-parquet" if "parquet" in kind else ""))
        cfg = load_config("digits", dict(data=data, epochs=args.epochs, workers=args.workers, output=out,
                                         log_every=10_000))
        metrics = train(cfg)
        rows.append((kind, data, metrics["val_top1"], metrics["val_top1_raw"], metrics["train_images_per_s"]))
    print(f"\n| format | --data | val top-1 (preferred) | raw top-1 | train img/s |\n|---|---|---|---|---|")
    for kind, data, top1, raw, speed in rows:
        print(f"| {kind} | `{data}` | {top1:.2f}% | {raw:.2f}% | {speed:.0f} |")


if __name__ == "__main__":
    main()

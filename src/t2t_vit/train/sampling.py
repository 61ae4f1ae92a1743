"""Reproducible sampling: augmentation randomness tied to (seed, epoch, index), not to the process."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from t2t_vit.train.distributed import ShardedSampler


class SeededDataset(Dataset):
    """Train-set wrapper whose augmentation randomness depends only on (seed, epoch, index), so a
    resumed run, any worker count and any number of processes see the same augmented images.
    The sampler yields (epoch, index) keys, which lets loader workers persist across epochs."""

    def __init__(self, dataset: Dataset, seed: int, seeded: bool) -> None:
        self.dataset, self.seed, self.seeded = dataset, seed, seeded

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if not self.seeded:
            return self.dataset[index]
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        in_worker = torch.utils.data.get_worker_info() is not None
        with torch.random.fork_rng(devices=[], enabled=not in_worker):
            py_state, np_state = (None, None) if in_worker else (random.getstate(), np.random.get_state())
            # The CPU generator alone: torch.manual_seed also seeds every accelerator backend, a cost
            # paid once per sample for nothing (the CPU stream is the same; timings: docs/benchmarks.md).
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            item = self.dataset[index]
            if not in_worker:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return item


class EpochKeys(torch.utils.data.Sampler):
    def __init__(self, sampler: ShardedSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        return ((self.sampler.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

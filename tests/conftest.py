import os

import pytest
import torch

from tiny_run import digits_folder, trained  # noqa: F401 (session fixtures: one tiny training run)

# Two cores: one intra-op thread per test process keeps runs predictable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("T2T_TEST_THREADS", "1")))

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""Every image size the soft splits accept gives the documented token count; others are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from t2t_vit import T2TViTError
from t2t_vit.t2t import STEMS, token_grid


def covered_by_unfold(size: int, kernel: int, stride: int, padding: int) -> tuple[int, bool]:
    """Independent check with unfold itself: token count, and whether every real pixel is in a window."""
    marker = torch.arange(1, size + 1, dtype=torch.float64).view(1, 1, 1, size)
    windows = F.unfold(marker, kernel_size=(1, kernel), stride=(1, stride), padding=(0, padding))
    seen = set(windows.flatten().tolist()) - {0.0}
    return windows.shape[-1], len(seen) == size


def expected_tokens(size: int, specs) -> int | None:
    for kernel, stride, padding in specs:
        if size + 2 * padding < kernel:
            return None
        count, covered = covered_by_unfold(size, kernel, stride, padding)
        if not covered:
            return None
        size = count
    return size


SPECS = {**STEMS, "patch16": ((16, 16, 0),), "patch4": ((4, 4, 0),)}


@settings(max_examples=150, deadline=None)
@given(stem=st.sampled_from(sorted(SPECS)), h=st.integers(1, 400), w=st.integers(1, 400))
def test_token_grid_accepts_exactly_the_tileable_sizes(stem, h, w):
    specs = SPECS[stem]
    want_h, want_w = expected_tokens(h, specs), expected_tokens(w, specs)
    if want_h is None or want_w is None:
        with pytest.raises(T2TViTError, match="sides that work near it: [0-9]"):
            token_grid((h, w), specs)
    else:
        assert token_grid((h, w), specs) == (want_h, want_w)


def test_documented_token_counts():
    assert token_grid((224, 224), STEMS["imagenet"]) == (14, 14)
    assert token_grid((384, 384), STEMS["imagenet"]) == (24, 24)
    assert token_grid((32, 32), STEMS["small"]) == (8, 8)


def test_refusal_names_working_sizes():
    with pytest.raises(T2TViTError) as err:
        token_grid((226, 224), STEMS["imagenet"])
    assert "225, 227" in str(err.value)

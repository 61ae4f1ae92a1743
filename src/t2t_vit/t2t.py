"""The Tokens-to-Token module (paper §3.1, Eq. 1–4); the ablations' tokenizers are in ``tokenizers.py``.

One T2T step: re-structurize the tokens into an image (Eq. 2), soft split it into overlapping
k×k patches (Eq. 3), and let a narrow transformer layer model the new, longer tokens (Eq. 1).
The module does this ``len(stem) - 1`` times and projects the final soft split to the backbone
width (Eq. 4).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError
from timm.layers import register_notrace_function

from t2t_vit import switchboard
from t2t_vit.t2t_layers import T2T_LAYERS

# (kernel, stride, padding) of each soft split.
SoftSplitSpec = tuple[int, int, int]
STEMS: dict[str, tuple[SoftSplitSpec, ...]] = {
    # 224 px → 56 → 28 → 14: 196 tokens, as in the paper.
    "imagenet": ((7, 4, 2), (3, 2, 1), (3, 2, 1)),
    # 32 px → 32 → 16 → 8: 64 tokens, for CIFAR-sized images.
    "small": ((3, 1, 1), (3, 2, 1), (3, 2, 1)),
}


def split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one side of a soft split (paper Eq. 3)."""
    return (size + 2 * padding - kernel) // stride + 1


def side_after_splits(size: int, specs: List[Tuple[int, int, int]]) -> Optional[int]:
    """Tokens along one side after every soft split, or None if a split would drop input pixels.

    A split drops pixels when its last window ends before the last real (unpadded) pixel; unfold
    would silently crop them, so such sizes are refused rather than half-used.
    """
    for kernel, stride, padding in specs:
        if size + 2 * padding < kernel:
            return None
        out = split_size(size, kernel, stride, padding)
        if (out - 1) * stride + kernel < size + padding:
            return None
        size = out
    return size


def sizes_that_work(size: int, specs: Sequence[SoftSplitSpec], count: int = 2) -> list[int]:
    """The closest side lengths below and above ``size`` that the soft splits accept."""
    specs = [tuple(s) for s in specs]
    below = [s for s in range(size - 1, 0, -1) if side_after_splits(s, specs)][:count]
    above = [s for s in range(size + 1, size + 64) if side_after_splits(s, specs)][:count]
    return sorted(below + above)


def _untileable(img_size: Tuple[int, int], side: int, specs: Sequence[SoftSplitSpec]) -> T2TViTError:
    schedule = ", ".join(f"{k}/{s}" for k, s, _ in specs)
    working = sizes_that_work(side, specs)
    problem = "is too small" if side < working[0] else "would lose pixels"
    return T2TViTError(
        f"image size {img_size[0]}x{img_size[1]} cannot be tiled by the soft splits "
        f"(kernel/stride {schedule}): a side of {side} px {problem}; "
        f"sides that work near it: {', '.join(map(str, working))}"
    )


def token_grid(img_size: Tuple[int, int], specs: List[Tuple[int, int, int]]) -> Tuple[int, int]:
    """The (h, w) token grid after all soft splits; a clear error for sizes they cannot tile."""
    height, width = int(img_size[0]), int(img_size[1])
    rows, cols = side_after_splits(height, specs), side_after_splits(width, specs)
    if rows is None or cols is None:
        if torch.jit.is_scripting():
            raise RuntimeError("the image size cannot be tiled by the soft splits")
        else:
            raise _untileable((height, width), height if rows is None else width, specs)
    return rows, cols


def restructurize(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, h·w, C) tokens → (B, C, h, w) image, row-major (paper Eq. 2)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def pixel_major_windows(image: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """The soft split's k×k windows of (B, C, H, W) as a (B, h, w, k, k, C) view of the padded
    channels-last pixels: each window's features pixel-major, runs of k·C contiguous values."""
    k, s, p = kernel, stride, padding
    pixels = F.pad(image.permute(0, 2, 3, 1), [0, 0, p, p, p, p])  # (B, H+2p, W+2p, C)
    return pixels.unfold(1, k, s).unfold(2, k, s).permute(0, 1, 2, 4, 5, 3)


def pixel_major_patches(image: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """Soft split (B, C, H, W) → (B, L, k·k·C), each patch's features pixel-major."""
    windows = pixel_major_windows(image, kernel, stride, padding)
    return windows.reshape(image.shape[0], -1, image.shape[1] * kernel * kernel)


@torch.library.custom_op("t2t_vit::pixel_major_patches", mutates_args=())
def _pixel_major_patches_op(image: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    windows = pixel_major_windows(image, kernel, stride, padding).clone(memory_format=torch.contiguous_format)
    return windows.view(image.shape[0], -1, image.shape[1] * kernel * kernel)  # one copy, never the input


@_pixel_major_patches_op.register_fake
def _(image: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    rows = split_size(image.shape[2], kernel, stride, padding)
    cols = split_size(image.shape[3], kernel, stride, padding)
    return image.new_empty(image.shape[0], rows * cols, image.shape[1] * kernel * kernel)


def opaque_gather_wanted(image: Tensor) -> bool:
    """Whether inductor is compiling an inference graph: it would fuse the pixel-major gather into
    the LayerNorm after it as scalar index arithmetic (18 ms a batch of 8 against 2 ms eager), so
    the gather is handed to it as one opaque op (it has no backward: a split whose input needs a
    gradient, ``torch.export``, FX and tracing keep the differentiable view ops)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not image.requires_grad


class SoftSplit(nn.Module):
    """Overlapping k×k patches flattened into tokens: (B, C, H, W) → (B, L, C·k·k), channel-major.

    ``soft_split_method`` (see :mod:`t2t_vit.switchboard`): "strided" gathers the patches from a
    channels-last view in one copy, so tokens that were just re-structurized are split without a
    transpose and come out contiguous for the LayerNorm that follows; "unfold" is ``nn.Unfold``
    followed by a transpose, as the paper's code has it. Both give the same tokens.

    With ``pixel_major``, :meth:`split` (which the T2T module calls) returns the same features in
    pixel-major order (k·k positions × C channels) with ``order``, the channel-major index of each:
    from channels-last pixels that gather copies runs of k·C contiguous values, where the
    channel-major one reads every value C apart (4–25× slower here), and the next T2T layer reads
    its parameters in ``order`` instead.
    """

    def __init__(self, kernel: int, stride: int, padding: int, channels: int = 0, pixel_major: bool = False) -> None:
        super().__init__()
        if pixel_major and channels < 1:
            raise ValueError("a pixel-major soft split needs the number of input channels")
        self.kernel, self.stride, self.padding, self.channels = kernel, stride, padding, channels
        self.soft_split_method = switchboard.default("soft_split")
        self.pixel_major = pixel_major

    def forward(self, image: Tensor) -> Tensor:
        k, s, p = self.kernel, self.stride, self.padding
        if self.soft_split_method == "unfold":
            return F.unfold(image, kernel_size=k, stride=s, padding=p).transpose(1, 2)
        windows = pixel_major_windows(image, k, s, p).permute(0, 1, 2, 5, 3, 4)  # (B, h, w, C, k, k)
        return windows.reshape(image.shape[0], -1, image.shape[1] * k * k).contiguous()  # no-op unless k = 1

    def split(self, image: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The tokens and, where they are pixel-major, the channel-major index of each feature."""
        if self.soft_split_method != "strided" or not self.pixel_major:
            return self(image), None
        k, s, p = self.kernel, self.stride, self.padding
        # made per call from Python ints: a buffer would be left empty by meta-device construction, and
        # an order computed from the input's shape is not a constant to OpenVINO's static-shape conversion
        order = torch.arange(self.channels * k * k, device=image.device)
        order = order.view(self.channels, k, k).permute(1, 2, 0).reshape(-1)
        if torch.jit.is_scripting():  # (the branches below are not compiled)
            return pixel_major_patches(image, k, s, p), order
        elif opaque_gather_wanted(image):
            return torch.ops.t2t_vit.pixel_major_patches(image, k, s, p), order
        else:
            return pixel_major_patches(image, k, s, p), order

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


def resolve_stem(stem: str | Sequence[SoftSplitSpec]) -> list[SoftSplitSpec]:
    if isinstance(stem, str):
        if stem not in STEMS:
            raise T2TViTError(f"unknown stem {stem!r}; choose one of {sorted(STEMS)}")
        return list(STEMS[stem])
    return [tuple(int(v) for v in spec) for spec in stem]  # type: ignore[misc]


@register_notrace_function
@torch.fx.wrap
def cast_for_autocast(image: Tensor) -> Tensor:
    """The image in the autocast dtype when autocast is on (else as it is).

    The first soft split and its LayerNorm touch the most bytes (e.g. 3136 tokens × 147): splitting
    in the autocast dtype saves running them in fp32 only to cast for the next Linear.
    """
    if torch.jit.is_scripting():
        return image
    else:
        device = "cuda" if image.is_cuda else "cpu"
        if torch.is_autocast_enabled(device):
            return image.to(torch.get_autocast_dtype(device))
        return image


class T2TModule(nn.Module):
    """Soft split → [T2T layer → re-structurize → soft split] × (len(stem) − 1) → projection.

    Children are registered in the order they run (soft_split0, attention1, soft_split1, ...,
    project), which is how the forward walks them.
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 384,
        token_dim: int = 64,
        layer: str = "performer",
        stem: str | Sequence[SoftSplitSpec] = "imagenet",
        kernel_ratio: float = 0.5,
        drop_rate: float = 0.1,
        pixel_norm: str = "layernorm",
    ) -> None:
        super().__init__()
        if layer not in T2T_LAYERS:
            raise T2TViTError(f"unknown T2T layer {layer!r}; choose one of {sorted(T2T_LAYERS)}")
        self.specs = resolve_stem(stem)
        width = in_chans
        for index, (kernel, stride, padding) in enumerate(self.specs):
            # the last split stays channel-major: `project` then runs as the module users hook and pick
            pixel_major = index < len(self.specs) - 1
            self.add_module(f"soft_split{index}", SoftSplit(kernel, stride, padding, width, pixel_major))
            width = width * kernel * kernel
            if index < len(self.specs) - 1:
                options = dict(kernel_ratio=kernel_ratio, drop=drop_rate) if layer == "performer" else {}
                norm1 = pixel_norm if index == 0 else "layernorm"  # only the first layer sees raw pixels
                self.add_module(f"attention{index + 1}", T2T_LAYERS[layer](width, token_dim, norm1=norm1, **options))
                width = token_dim
        self.project = nn.Linear(width, embed_dim)

    def grid(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return token_grid(img_size, self.specs)

    def forward(self, image: Tensor) -> Tensor:
        """(B, C, H, W) → (B, h·w, embed_dim)."""
        return self.forward_stages(image)[0]

    def forward_stages(self, image: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """The tokens, and each T2T layer's re-structurized output image (B, token_dim, h, w)."""
        image = cast_for_autocast(image)
        tokens = image
        height, width = image.shape[-2], image.shape[-1]
        stages: List[Tensor] = []
        order: Optional[Tensor] = None  # the feature order of pixel-major tokens, None when channel-major
        # children are told apart by hasattr: isinstance fails under TorchScript once a class is
        # compiled to more than one (mangled) type
        for child in self.children():  # in the order they run
            if hasattr(child, "soft_split_method"):  # a SoftSplit
                kernel, stride, padding = child.kernel, child.stride, child.padding
                height, width = split_size(height, kernel, stride, padding), split_size(width, kernel, stride, padding)
                tokens, order = child.split(image)
            elif hasattr(child, "norm1"):  # a T2T layer
                image = restructurize(child(tokens, order), height, width)
                stages.append(image)
            else:  # the projection to the backbone width (Eq. 4)
                tokens = child(tokens)
        return tokens, stages


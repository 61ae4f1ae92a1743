"""Look inside a T2T-ViT: token features as images (paper Fig. 2) and class-token attention.

`t2t-vit visualize features` reshapes the tokens after each T2T layer and after chosen backbone
blocks back into images and plots some of their channels in a labelled grid. `t2t-vit visualize
attention` overlays the last block's class-token attention (mean over heads) and the attention
rollout (Abnar & Zuidema, 2020) on the image. Attention is captured with forward hooks on the
backbone's Attention modules, so the model code stays untouched.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from t2t_vit.cli_args import add_model_args, add_runtime_args, load_inference
from t2t_vit.errors import T2TViTError
from t2t_vit.inference import Inference, read_image
from t2t_vit.layers import Attention
from t2t_vit.model import T2TViT
from t2t_vit.plotting import pyplot, save_figure
from t2t_vit.t2t import T2TModule

SAMPLE_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


def sample_image(name: str = "chelsea") -> Image.Image:
    """A real photograph bundled with scikit-image (no download)."""
    import skimage.data

    if name not in SAMPLE_PHOTOS:
        raise T2TViTError(f"unknown sample photo {name!r}; choose one of {', '.join(SAMPLE_PHOTOS)}")
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def prepare(clf: Inference, image: Image.Image) -> tuple[Tensor, np.ndarray]:
    """The model's input (1, 3, H, W), preprocessed as the weights were trained (the checkpoint's
    mean/std/crop), and the same crop as an RGB array in [0, 1] for display."""
    x = clf.tensor([image])
    mean = torch.as_tensor(clf.config["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(clf.config["std"], dtype=torch.float32).view(3, 1, 1)
    shown = (x[0].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return x, shown


def default_blocks(depth: int) -> list[int]:
    """First, middle and last block (1-based)."""
    return sorted({1, (depth + 1) // 2, depth})


@torch.no_grad()
def feature_maps(model: T2TViT, x: Tensor, blocks: Sequence[int]) -> list[tuple[str, Tensor]]:
    """(label, (C, h, w) map) for each T2T layer's re-structurized tokens and each chosen block.

    ``blocks`` are 1-based indices into ``model.blocks``; their tokens (class token dropped) are
    reshaped to the token grid.
    """
    depth = len(model.blocks)
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise T2TViTError(f"block numbers must be between 1 and {depth} for this model, got {bad}")
    maps: list[tuple[str, Tensor]] = []
    if isinstance(model.tokens_to_token, T2TModule):
        _, stages = _t2t_stages(model.tokens_to_token, x)
        maps += [(f"T2T layer {i}", stage[0]) for i, stage in enumerate(stages, 1)]
    indices = sorted(set(b - 1 for b in blocks))
    levels = [model.num_stem_levels + i for i in indices]  # feature levels list the T2T module's maps first
    outputs = model.forward_intermediates(x, indices=levels, intermediates_only=True, output_fmt="NCHW")
    maps += [(f"block {i + 1}", out[0]) for i, out in zip(indices, outputs)]
    return maps


def _t2t_stages(t2t: T2TModule, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The T2T module's tokens and its re-structurized token images, one per T2T layer."""
    return t2t.forward_stages(x)


def _normalise(img: Tensor) -> np.ndarray:
    """Each map scaled to [0, 1] on its own, as in the paper's figure (constant maps stay 0)."""
    img = img.float()
    lo, hi = img.min(), img.max()
    return ((img - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy()


def plot_features(
    image: np.ndarray, maps: Sequence[tuple[str, Tensor]], channels: int, output: str | Path, title: str
) -> Path:
    """A grid: one row per stage (input image first), one column per channel."""
    plt = pyplot()
    rows, cols = len(maps), channels + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols + 0.6, 1.05 * rows + 0.7), squeeze=False)
    for row, (label, fmap) in enumerate(maps):
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(f"{label}\n{fmap.shape[1]}×{fmap.shape[2]}, {fmap.shape[0]} ch", fontsize=8)
        for col in range(1, cols):
            ax = axes[row, col]
            if col - 1 < fmap.shape[0]:
                ax.imshow(_normalise(fmap[col - 1]), cmap="viridis", interpolation="nearest")
            if row == 0:
                ax.set_title(f"ch {col - 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, output)


@torch.no_grad()
def attention_maps(model: T2TViT, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Softmax attention (B, heads, N, N) of every backbone block, in order, and the logits.

    Forward hooks recompute softmax(q·kᵀ·scale) from each Attention module's input, so this
    works whether the module runs the fused kernel or the plain path.
    """
    captured: list[Tensor] = []

    def hook(module: Attention, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        q, k, _ = module.project_qkv(inputs[0])
        batch, tokens, _ = q.shape
        q, k = (t.reshape(batch, tokens, module.num_heads, -1).transpose(1, 2) for t in (q, k))
        captured.append(((q * module.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1))

    handles = [m.register_forward_hook(hook) for m in model.blocks.modules() if isinstance(m, Attention)]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured, logits


def attention_rollout(attentions: Sequence[Tensor]) -> Tensor:
    """Attention rollout: the product over blocks of (mean-over-heads attention + identity), row-normalised."""
    rollout = None
    for attn in attentions:
        a = attn.mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise T2TViTError("the model has no attention blocks to visualise")
    return rollout


def cls_attention(model: T2TViT, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(last-block class-token attention, rollout) as (h, w) grids for the first image, and the logits."""
    attentions, logits = attention_maps(model, x)
    grid = model.tokens_to_token.grid(tuple(x.shape[-2:]))
    prefix = model.num_prefix_tokens
    last = attentions[-1][0].mean(dim=0)[0, prefix:].reshape(grid)
    rolled = attention_rollout(attentions)[0, 0, prefix:].reshape(grid)
    return last, rolled, logits


def plot_attention(image: np.ndarray, maps: Sequence[tuple[str, Tensor]], output: str | Path, title: str) -> Path:
    """Input image, then each (h, w) map upsampled to the image and overlaid as a heat map."""
    plt = pyplot()
    height, width = image.shape[:2]
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.6 * (len(maps) + 1), 3.9))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=10)
    for ax, (label, grid_map) in zip(axes[1:], maps):
        heat = F.interpolate(grid_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
        ax.imshow(image)
        overlay = ax.imshow(_normalise(heat[0, 0]), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(f"{label}\n({grid_map.shape[0]}×{grid_map.shape[1]} tokens)", fontsize=10)
        fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.04, label="relative attention")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, output)


def _image(args: argparse.Namespace) -> tuple[Image.Image, str]:
    if args.image:
        return read_image(args.image), Path(args.image).name
    return sample_image(args.sample), f"skimage '{args.sample}'"


def run_features(args: argparse.Namespace) -> int:
    clf = load_inference(args)
    model = clf.model
    image, source = _image(args)
    x, shown = prepare(clf, image)
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else default_blocks(len(model.blocks))
    maps = feature_maps(model, x, blocks)
    title = f"{clf.description}: token features reshaped to images, first {args.channels} channels — {source}"
    path = plot_features(shown, maps, args.channels, args.output, title)
    print(f"wrote {path} ({', '.join(f'{label} {tuple(m.shape)}' for label, m in maps)})")
    return 0


def run_attention(args: argparse.Namespace) -> int:
    clf = load_inference(args)
    model = clf.model
    image, source = _image(args)
    x, shown = prepare(clf, image)
    last, rolled, logits = cls_attention(model, x)
    title = f"{clf.description}: class-token attention — {source}"
    if (args.checkpoint or args.pretrained) and model.num_classes:
        title += f"\nprediction: {clf.class_names[int(logits[0].argmax())]}"
    maps = [(f"block {len(model.blocks)} cls attention (head mean)", last), ("attention rollout", rolled)]
    path = plot_attention(shown, maps, args.output, title)
    print(f"wrote {path} (token grid {tuple(last.shape)}, {len(model.blocks)} blocks rolled out)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_runtime_args(p, precision=False)
    p.add_argument("--image", help="image file (default: a scikit-image sample photograph)")
    p.add_argument("--sample", default="chelsea", choices=SAMPLE_PHOTOS, help="which sample photo without --image")
    p.add_argument("--output", required=True, help="PNG file to write")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("visualize", help="plot token features (paper Fig. 2) or attention maps")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    f = kinds.add_parser("features", help="token features after the T2T layers and chosen blocks, as images")
    _common(f)
    f.add_argument("--blocks", help="1-based block numbers, comma-separated (default: first, middle, last)")
    f.add_argument("--channels", type=int, default=16, help="channels shown per row (default 16)")
    f.set_defaults(func=run_features)
    a = kinds.add_parser("attention", help="class-token attention and attention rollout over the image")
    _common(a)
    a.set_defaults(func=run_attention)

"""T2T-ViT: tokenizer → [cls; tokens] + fixed sinusoid table → blocks → norm → head (paper Eq. 5).

The class also fulfils timm's model contract (forward_features / forward_head, intermediates,
gradient checkpointing, classifier reset, weight-decay exclusions) so every timm tool works.
"""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn
from timm.layers import register_notrace_function, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from t2t_vit.blocks import DenseBlock, Transition, build_blocks
from t2t_vit.errors import T2TViTError
from t2t_vit.layers import sinusoid_table
from t2t_vit.t2t import SoftSplitSpec, T2TModule, token_grid
from t2t_vit.tokenizers import build_tokenizer


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def to_2tuple_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """``img_size`` as (height, width) of positive ints; anything else is one line."""
    if _positive_int(img_size):
        return img_size, img_size  # type: ignore[return-value]
    if isinstance(img_size, (list, tuple)) and len(img_size) == 2 and all(map(_positive_int, img_size)):
        return int(img_size[0]), int(img_size[1])
    raise T2TViTError(f"img_size must be a positive int or (height, width) of positive ints, got {img_size!r}")


def check_stem(stem: object, tokenizer: str = "performer") -> None:
    """A stem name, or a non-empty list of [kernel >= 1, stride >= 1, 0 <= padding < kernel]
    (the plain patch tokenizer has no stem)."""
    if isinstance(stem, str) or tokenizer == "patch":
        return
    specs = list(stem) if isinstance(stem, (list, tuple)) else []
    ok = bool(specs) and all(
        isinstance(spec, (list, tuple)) and len(spec) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in spec)
        and spec[0] >= 1 and spec[1] >= 1 and 0 <= spec[2] < spec[0] for spec in specs)
    if not ok:
        raise T2TViTError(f"stem must be a stem name or a non-empty list of [kernel, stride, padding] with kernel "
                          f">= 1, stride >= 1 and 0 <= padding < kernel, got {stem!r}")


class T2TViT(nn.Module):
    """Tokens-to-Token Vision Transformer and the paper's ViT / ablation variants.

    Args:
        img_size: input size, an int or (height, width); the position table is built for it.
        tokenizer: "performer" or "transformer" (T2T module with that layer kind), "conv"
            (T2T-ViTc), or "patch" (plain ViT patch split).
        stem: soft-split schedule, "imagenet" (7/4, 3/2, 3/2), "small" (3/1, 3/2, 3/2, for
            32 px images) or a sequence of (kernel, stride, padding).
        block: "standard", "se" or "ghost".
        dense_stages / growth: dense connectivity (blocks per stage, channels each block adds).
        dynamic_img_size: accept other input sizes by resampling the position table on the fly.
        t2t_kernel_ratio / t2t_drop_rate: the Performer T2T layer's random features per token
            width and its dropout (the authors' 0.5 and 0.1); small-data studies vary them.
        t2t_pixel_norm: how the first T2T layer normalises its raw-pixel patches: "layernorm"
            (the paper's), "rmsnorm" (keeps each patch's mean) or "none" (docs/experiments.md).
        token_label_head: add Token Labeling's auxiliary head ``aux_head`` (a Linear over the patch
            tokens, the key names of Token Labeling's LV-ViT models) for checkpoints trained with
            it, e.g. the authors' T2T-ViT-24 "tl" release. Inference then follows LV-ViT's published
            rule: logits = head(cls token) + 0.5 · max over patch tokens of aux_head(token).
            Assumption: the released file holds such a head under these keys; it cannot be
            inspected here.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        tokenizer: str = "performer",
        stem: str | Sequence[SoftSplitSpec] = "imagenet",
        token_dim: int = 64,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        mlp_hidden_dim: int | None = None,
        qkv_bias: bool = False,
        block: str = "standard",
        dense_stages: Sequence[int] | None = None,
        growth: int = 0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        dynamic_img_size: bool = False,
        t2t_kernel_ratio: float = 0.5,
        t2t_drop_rate: float = 0.1,
        t2t_pixel_norm: str = "layernorm",
        token_label_head: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise T2TViTError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        self.img_size = to_2tuple_size(img_size)
        check_stem(stem, tokenizer)
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, global_pool
        self.dynamic_img_size, self.num_prefix_tokens, self.grad_checkpointing = dynamic_img_size, 1, False
        self.embed_dim = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.tokens_to_token = build_tokenizer(
            tokenizer, in_chans, embed_dim, token_dim, stem, patch_size,
            kernel_ratio=t2t_kernel_ratio, drop_rate=t2t_drop_rate, pixel_norm=t2t_pixel_norm,
        )
        self.grid_size = self.tokens_to_token.grid(self.img_size)
        num_tokens = self.grid_size[0] * self.grid_size[1]
        # A fixed table, so a buffer (no gradient, no optimizer state) under the checkpoints' key.
        self.register_buffer("pos_embed", sinusoid_table(num_tokens + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks, self.num_features = build_blocks(
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate,
            kind=block, mlp_hidden_dim=mlp_hidden_dim, dense_stages=dense_stages, growth=growth,
        )
        self.head_hidden_size = self.num_features
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.token_label_head = token_label_head
        self.aux_head = self._aux_head(num_classes)
        self._build_feature_pyramid(token_dim)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def _build_feature_pyramid(self, token_dim: int) -> None:
        # a parameter-free level at twice the backbone's stride, the top of the feature pyramid
        self.pyramid_pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.feature_info = self._stem_feature_info(token_dim) + self._block_feature_info() + [
            dict(module="pyramid_pool", num_chs=self.num_features, reduction=2 * self.reduction)]

    @property
    def num_stem_levels(self) -> int:
        """Feature maps the T2T module gives before the backbone (its re-structurized images)."""
        return len(self.tokens_to_token.specs) - 1 if isinstance(self.tokens_to_token, T2TModule) else 0

    def _stem_feature_info(self, token_dim: int) -> list:
        info, reduction = [], 1
        for index, (_, stride, _) in enumerate(self.tokens_to_token.specs[: self.num_stem_levels]):
            reduction *= stride
            info.append(dict(module=f"tokens_to_token.attention{index + 1}", num_chs=token_dim, reduction=reduction))
        return info

    def _block_feature_info(self) -> list:
        info, width = [], self.embed_dim
        for index, blk in enumerate(self.blocks):
            width = _out_width(blk, width)
            info.append(dict(module=f"blocks.{index}", num_chs=width, reduction=self.reduction))
        return info

    # ---- geometry -------------------------------------------------------------------------
    @property
    def reduction(self) -> int:
        return max(1, self.img_size[0] // self.grid_size[0])

    def _position_table(self, grid: tuple[int, int]) -> Tensor:
        return fit_position_table(self.pos_embed, grid, self.grid_size, self.dynamic_img_size, self.img_size)

    # ---- forward --------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Image → tokens with cls token and position table, before the blocks.

        The input is cast to the weights' dtype (a no-op in fp32), so a bf16 model takes fp32 images.
        """
        table = self._table(x)
        return self._with_cls_and_table(self.tokens_to_token(x.to(self.cls_token.dtype)), table)

    def _table(self, x: Tensor) -> Tensor:
        return position_table_for(x, self.pos_embed, self.tokens_to_token.specs, self.grid_size,
                                  self.dynamic_img_size, self.img_size, self.in_chans)

    def _with_cls_and_table(self, tokens: Tensor, table: Tensor) -> Tensor:
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        return self.pos_drop(tokens + table.to(tokens.dtype))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        if torch.jit.is_scripting():
            x = self.blocks(x)
        elif self.grad_checkpointing:
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: Tensor) -> Tensor:
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.global_pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.head_drop(self.pool(x))
        if pre_logits:
            return pooled
        logits = self.head(pooled)
        if self.token_label_head and self.num_classes > 0 and self.global_pool != "":
            # Token Labeling (LV-ViT) inference: class-token logits + 0.5 · max over patch-token logits.
            logits = logits + 0.5 * self.aux_head(x[:, self.num_prefix_tokens :]).amax(dim=1)
        return logits

    def _aux_head(self, num_classes: int) -> nn.Module:
        if self.token_label_head and num_classes > 0:
            return nn.Linear(self.num_features, num_classes)
        return nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API over ``feature_info``: the T2T module's re-structurized maps
        (strides 4 and 8 with the ImageNet stem), every block's output (stride 16) and a 2×2 max-pool
        of the last block's (stride 32), as NCHW maps or NLC tokens. ``indices`` index that list."""
        if output_fmt not in ("NCHW", "NLC"):
            raise T2TViTError("output_fmt must be 'NCHW' or 'NLC'")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        stem, pyramid = self.num_stem_levels, len(self.feature_info) - 1
        grid = self.tokens_to_token.grid(tuple(x.shape[-2:]))
        table = self._table(x)
        if stem:
            tokens, stages = self.tokens_to_token.forward_stages(x.to(self.cls_token.dtype))
        else:
            tokens, stages = self.tokens_to_token(x.to(self.cls_token.dtype)), []
        intermediates = [_as_fmt(m, output_fmt) for i, m in enumerate(stages) if i in take]
        x = self._with_cls_and_table(tokens, table)
        last = len(self.blocks) - 1 if not stop_early or pyramid in take else max_index - stem
        for i, block in enumerate(self.blocks[: max(last + 1, 0)]):
            x = block(x)
            if stem + i in take or (pyramid in take and i == len(self.blocks) - 1):
                y = self.norm(x) if norm and x.shape[-1] == self.num_features else x
                y = y[:, self.num_prefix_tokens :].transpose(1, 2)
                y = y.reshape(y.shape[0], y.shape[1], grid[0], grid[1])
                if stem + i in take:
                    intermediates.append(_as_fmt(y, output_fmt))
                if pyramid in take and i == len(self.blocks) - 1:
                    intermediates.append(_as_fmt(self.pyramid_pool(y), output_fmt))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True):
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index < len(self.feature_info) - 1:  # the pyramid level needs every block
            self.blocks = self.blocks[: max(max_index - self.num_stem_levels + 1, 0)]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    # ---- timm contract --------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|tokens_to_token", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = self._aux_head(num_classes)
        if num_classes > 0:
            _init_weights(self.head)
            _init_weights(self.aux_head)


def resample_position_table(table: Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int]) -> Tensor:
    """Bicubic resampling of a (1, 1 + h·w, D) table over its grid, cls row kept.

    Plain bicubic (no antialiasing), as the authors' loader does, so fine-tuned checkpoints agree.
    """
    return resample_abs_pos_embed(
        table, new_size=[new_grid[0], new_grid[1]], old_size=[old_grid[0], old_grid[1]], num_prefix_tokens=1,
        antialias=False,
    )


def _channel_hint(image: Tensor, in_chans: int) -> str:
    if image.dim() == 4 and image.shape[0] > 0 and in_chans > 0:
        return (f"; this model takes {in_chans}-channel images (repeat a grey image into {in_chans} channels, or "
                f"create the model with in_chans={image.shape[1]})")
    return ""


def fit_position_table(
    table: Tensor, grid: Tuple[int, int], built: Tuple[int, int], dynamic: bool, img_size: Tuple[int, int]
) -> Tensor:
    """The position table for a ``grid`` of tokens: the model's own, or resampled if ``dynamic``."""
    if grid[0] == built[0] and grid[1] == built[1]:
        return table
    if not dynamic:
        if torch.jit.is_scripting():
            raise RuntimeError("the input gives another token grid than the model was built for")
        else:
            raise T2TViTError(
                f"this model was built for {img_size[0]}x{img_size[1]} inputs "
                f"({built[0]}x{built[1]} tokens) but got a {grid[0]}x{grid[1]} token grid; create it with "
                "the right img_size, or with dynamic_img_size=True to resample the position table"
            )
    return resample_position_table(table, grid, built)


@register_notrace_function
@torch.fx.wrap
def position_table_for(
    image: Tensor, table: Tensor, specs: List[Tuple[int, int, int]], built: Tuple[int, int], dynamic: bool,
    img_size: Tuple[int, int], in_chans: int = -1,
) -> Tensor:
    """The position table for ``image`` (checked: 4-D, at least one image, ``in_chans`` channels,
    a size the soft splits tile).

    Depends on the input's shape through Python control flow, so ``torch.fx`` keeps it as one call.
    """
    if image.dim() != 4 or image.shape[0] == 0 or (in_chans > 0 and image.shape[1] != in_chans):
        if torch.jit.is_scripting():
            raise RuntimeError("expected a non-empty batch of images (batch, in_chans, height, width)")
        else:
            raise T2TViTError(f"expected a non-empty batch of images of shape (batch, {in_chans}, height, width), "
                              f"got {tuple(image.shape)}" + _channel_hint(image, in_chans))
    grid = token_grid((image.shape[-2], image.shape[-1]), specs)
    return fit_position_table(table, grid, built, dynamic, img_size)


def _as_fmt(feature_map: Tensor, output_fmt: str) -> Tensor:
    """An NCHW map as it is, or as NLC tokens."""
    return feature_map.flatten(2).transpose(1, 2) if output_fmt == "NLC" else feature_map.contiguous()


def _out_width(block: nn.Module, width: int) -> int:
    if isinstance(block, DenseBlock):
        return width + block.dense_linear.out_features
    if isinstance(block, Transition):
        return block.linear.out_features
    return width


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


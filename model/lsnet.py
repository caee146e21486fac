"""LSNet: "See Large, Focus Small" (CVPR 2025), in timm's model-file style.

Parameter and buffer names follow the official release so its checkpoints load with ``strict=True``.
The models follow timm's contract (``forward_features`` / ``forward_head`` / ``global_pool`` / ``feature_info`` /
``forward_intermediates``, ``features_only=True``, TorchScript, FX); ``fuse()`` folds the BatchNorms for inference.
"""

import itertools
import os
import pickle
from functools import lru_cache
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SqueezeExcite, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    clean_state_dict,
    generate_default_cfgs,
    load_pretrained,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.utils import reparameterize_model
from torch import nn

from .ska import SKA

__all__ = ["LSNet", "TEXTURE_STAGES", "texture_statistics", "Conv2d_BN", "BN_Linear", "checkpoint_filter_fn",
           "backbone_filter_fn", "load_pretrained_backbone", "MODEL_ARGS", "CLASSIFIER_PREFIXES", "HEAD_PREFIXES"]

CLASSIFIER_PREFIXES = ("head.", "head_dist.")  # the classifier heads (re-initialised for another class count)
HEAD_PREFIXES = (*CLASSIFIER_PREFIXES, "projection.")  # what a backbone initialisation leaves fresh
FIRST_CONV = "patch_embed.0.c"  # the stem's first convolution (timm adapts it to in_chans)


class Conv2d_BN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys ``c.*``, ``bn.*``)."""

    def __init__(self, in_chs: int, out_chs: int, ks: int = 1, stride: int = 1, pad: int = 0, dilation: int = 1,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chs, out_chs, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chs))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
        fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                          bias=True, device=c.weight.device, dtype=c.weight.dtype)
        fused.weight.copy_(c.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused


class BN_Linear(nn.Sequential):
    """BatchNorm1d followed by Linear (keys ``bn.*``, ``l.*``): the classifier and projection layers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(in_features))
        self.add_module("l", nn.Linear(in_features, out_features, bias=bias))
        trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, lin = self.bn, self.l
        scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
        shift = bn.bias - bn.running_mean * scale
        fused = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype)
        fused.weight.copy_(lin.weight * scale[None, :])
        bias = lin.weight @ shift
        fused.bias.copy_(bias if lin.bias is None else bias + lin.bias)
        return fused


class Residual(nn.Module):
    """``x + m(x)`` with optional stochastic depth on the branch (key ``m.*``)."""

    def __init__(self, m: nn.Module, drop: float = 0.0):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).to(x.dtype)
            return x + self.m(x) * keep / (1 - self.drop)
        return x + self.m(x)


class FFN(nn.Module):
    """Pointwise feed-forward: 1x1 conv-BN, ReLU, 1x1 conv-BN (zero-initialised output BN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = Conv2d_BN(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


class RepVGGDW(nn.Module):
    """Re-parameterisable depthwise token mixer: 3x3 dw conv-BN + 1x1 dw conv-BN + identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)
        self.conv1 = Conv2d_BN(dim, dim, 1, 1, 0, groups=dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.conv1(x) + x

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        conv = self.conv.fuse()
        conv1 = self.conv1.fuse()
        identity = torch.zeros_like(conv1.weight)
        identity[:, :, 0, 0] = 1
        conv.weight.add_(F.pad(conv1.weight + identity, [1, 1, 1, 1]))
        conv.bias.add_(conv1.bias)
        return conv


class LKP(nn.Module):
    """Large-kernel perception: predicts one k*k aggregation kernel per pixel for each group of channels."""

    def __init__(self, dim: int, lks: int = 7, sks: int = 3, groups: int = 8):
        super().__init__()
        self.cv1 = Conv2d_BN(dim, dim // 2)
        self.act = nn.ReLU()
        self.cv2 = Conv2d_BN(dim // 2, dim // 2, ks=lks, pad=(lks - 1) // 2, groups=dim // 2)
        self.cv3 = Conv2d_BN(dim // 2, dim // 2)
        self.cv4 = nn.Conv2d(dim // 2, sks * sks * dim // groups, kernel_size=1)
        self.norm = nn.GroupNorm(num_groups=dim // groups, num_channels=sks * sks * dim // groups)
        self.sks = sks
        self.groups = groups
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.cv3(self.cv2(self.act(self.cv1(x)))))
        w = self.norm(self.cv4(x))
        n, _, h, width = w.shape
        return w.view(n, self.dim // self.groups, self.sks * self.sks, h, width)


class LSConv(nn.Module):
    """LS convolution: LKP predicts weights that SKA applies, then BatchNorm and the residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.lkp = LKP(dim, lks=7, sks=3, groups=8)
        self.ska = SKA()
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.ska(x, self.lkp(x))) + x


def offset_index(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(H*W, H*W) index of |dy| * W + |dx| between every pair of positions of an H x W grid (row-major)."""
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    return (ys[:, None] - ys[None, :]).abs() * width + (xs[:, None] - xs[None, :]).abs()


@lru_cache(maxsize=64)
def relative_offset_index(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """:func:`offset_index`, cached per size and device.

    Built outside inference mode, so a cached index first made during inference also serves training.
    """
    with torch.inference_mode(False):
        return offset_index(height, width, device)


def attention_bias(biases: torch.Tensor, bias_idxs: torch.Tensor, resolution: int, height: int,
                   width: int) -> torch.Tensor:
    """(num_heads, H*W, H*W) bias for an H x W grid from the (num_heads, R*R) table of a ``resolution`` grid.

    The table is indexed by (|dy|, |dx|); for another grid it is resized (bicubic) to (H, W) first. At the stored
    size the index equals ``bias_idxs`` (the official buffer). A plain function so FX records it as one call.
    """
    if height == resolution and width == resolution:
        return biases[:, bias_idxs]
    num_heads = biases.shape[0]
    table = biases.view(1, num_heads, resolution, resolution).float()
    table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
    table = table.to(biases.dtype).view(num_heads, height * width)
    if torch.jit.is_scripting():
        index = offset_index(height, width, table.device)
    else:
        index = relative_offset_index(height, width, table.device)
    return table[:, index]


torch.fx.wrap("attention_bias")


class Attention(nn.Module):
    """Multi-head self-attention with learned attention biases over relative offsets (the MSA of the last stage).

    The biases are stored for a ``resolution x resolution`` grid (4x4 at 224 input). Other grid sizes,
    square or not, use the bias table resized by bicubic interpolation; at the stored size the table is used as is.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4, resolution: int = 14):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.attn_ratio = attn_ratio
        self.qkv = Conv2d_BN(dim, self.dh + self.nh_kd * 2)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.dh, dim, bn_weight_init=0.0))
        self.dw = Conv2d_BN(self.nh_kd, self.nh_kd, 3, 1, 1, groups=self.nh_kd)
        self.resolution = resolution
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.LongTensor(idxs).view(len(points), len(points)))

    def attention_bias(self, height: int, width: int) -> torch.Tensor:
        """(num_heads, H*W, H*W) bias for an H x W grid (see :func:`attention_bias`)."""
        return attention_bias(self.attention_biases, self.attention_bias_idxs, self.resolution, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        q, k, v = self.qkv(x).split([self.nh_kd, self.nh_kd, self.dh], dim=1)
        q = self.dw(q)
        q = q.reshape(b, self.num_heads, -1, n)
        k = k.reshape(b, self.num_heads, -1, n)
        v = v.reshape(b, self.num_heads, -1, n)
        attn = (q.transpose(-2, -1) @ k) * self.scale + self.attention_bias(h, w).to(q.dtype)
        attn = attn.softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).reshape(b, -1, h, w)
        return self.proj(x)


class Block(nn.Module):
    """One LSNet block: even depth index -> RepVGGDW + SE; odd -> LSConv (or attention in the last stage); FFN."""

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4, resolution: int = 14,
                 stage: int = -1, depth: int = -1, drop_path: float = 0.0):
        super().__init__()
        if depth % 2 == 0:
            self.mixer = RepVGGDW(dim)
            self.se = SqueezeExcite(dim, 0.25)
        else:
            self.se = nn.Identity()
            if stage == 3:
                self.mixer = Residual(Attention(dim, key_dim, num_heads, attn_ratio, resolution), drop_path)
            else:
                self.mixer = LSConv(dim)
        self.ffn = Residual(FFN(dim, int(dim * 2)), drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.se(self.mixer(x)))


class LSNet(nn.Module):
    """LSNet backbone with a BN+Linear classifier (and an optional distillation head averaged in eval).

    ``global_pool='avg'`` (default) pools the last map for the head; ``''`` returns the map itself (needs
    ``num_classes=0``). ``forward_features`` returns the last (N, C, H/64, W/64) map, ``forward_head(x, True)`` the
    pooled vector of ``head_hidden_size``. ``fuse()`` folds the BatchNorms for inference.
    """

    __jit_unused_properties__ = ["texture_dim"]  # TorchScript compiles properties; this one reads Python dicts

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 8,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: tuple[int, ...] = (64, 128, 192, 256),
        key_dim: tuple[int, ...] = (16, 16, 16, 16),
        depth: tuple[int, ...] = (1, 2, 3, 4),
        num_heads: tuple[int, ...] = (4, 4, 4, 4),
        distillation: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.distillation = distillation
        self.drop_rate = drop_rate
        self.global_pool = _check_pool(global_pool, num_classes)
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.grad_checkpointing = False
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim[0] // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(embed_dim[0] // 4, embed_dim[0] // 2, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(embed_dim[0] // 2, embed_dim[0], 3, 2, 1),
        )
        resolution = img_size // patch_size
        attn_ratio = [embed_dim[i] / (key_dim[i] * num_heads[i]) for i in range(len(embed_dim))]
        drop_paths = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
        stages = [nn.Sequential() for _ in embed_dim]
        block_idx = 0
        for i, (dim, kd, dpth, nh, ar) in enumerate(zip(embed_dim, key_dim, depth, num_heads, attn_ratio, strict=True)):
            for d in range(dpth):
                stages[i].append(Block(dim, kd, nh, ar, resolution, stage=i, depth=d, drop_path=drop_paths[block_idx]))
                block_idx += 1
            if i != len(depth) - 1:
                stages[i + 1].append(Conv2d_BN(dim, dim, ks=3, stride=2, pad=1, groups=dim))
                stages[i + 1].append(Conv2d_BN(dim, embed_dim[i + 1], ks=1, stride=1, pad=0))
                resolution = (resolution - 1) // 2 + 1
        self.blocks1, self.blocks2, self.blocks3, self.blocks4 = stages
        # An empty first stage (lsnet_t) passes the stem's output through: name the stem as that feature's module.
        self.feature_info = [
            dict(num_chs=dim, reduction=patch_size * 2**i, module=f"blocks{i + 1}" if len(stage) else "patch_embed")
            for i, (dim, stage) in enumerate(zip(embed_dim, stages, strict=True))
        ]
        self.head, head_dist = self._new_heads(num_classes)
        if distillation:
            self.head_dist = head_dist
        # The pre-logits layer (LSNetArtist's style projection), registered after the heads as in its checkpoints.
        self.projection: nn.Module = nn.Identity()

    def _new_heads(self, num_classes: int) -> tuple[nn.Module, nn.Module]:
        """Fresh classifier and distillation heads on ``head_hidden_size`` (Identity for 0 classes), in this
        model's device, dtype and train/eval mode."""
        ref = next(self.parameters())
        heads = []
        for _ in range(2):
            head = BN_Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
            heads.append(head.to(device=ref.device, dtype=ref.dtype).train(self.training))
        return heads[0], heads[1]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if "attention_biases" in name}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: the stem, then stages (coarse) or blocks."""
        return dict(stem=r"^patch_embed", blocks=r"^blocks(\d+)" if coarse else [(r"^blocks(\d+)\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier head(s) with fresh ones for ``num_classes`` (0 removes them).

        ``global_pool`` ('avg' or '' for no pooling) changes the pooling when given. The new heads are in the
        model's current train/eval mode, device and dtype.
        """
        self.global_pool = _check_pool(self.global_pool if global_pool is None else global_pool, num_classes)
        self.num_classes = num_classes
        self.head, head_dist = self._new_heads(num_classes)
        if self.distillation:
            self.head_dist = head_dist

    def stages(self) -> list[nn.Module]:
        """The four stages in order (``blocks1`` ... ``blocks4``)."""
        return [self.blocks1, self.blocks2, self.blocks3, self.blocks4]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage outputs selected by ``indices`` (last n if an int, all if None), and the last map.

        timm's semantics: returns ``(last_map, intermediates)``, or only the intermediates with
        ``intermediates_only``; ``stop_early`` skips the stages after the last one asked for. ``norm`` has no effect
        (LSNet has no final norm).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(4, indices)
        intermediates = []
        x = self.patch_embed(x)
        stages = self.stages()[:max_index + 1] if stop_early or intermediates_only else self.stages()
        for i, stage in enumerate(stages):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head, projection and pooling when
        ``prune_head`` or when stages were dropped); returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(4, indices)
        for i in range(max_index + 1, 4):
            setattr(self, f"blocks{i + 1}", nn.Sequential())
        if prune_head or max_index < 3:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.projection = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages: the last (N, C, H/64, W/64) feature map."""
        x = self.patch_embed(x)
        if not torch.jit.is_scripting() and self.grad_checkpointing:
            for stage in self.stages():
                x = checkpoint_seq(stage, x)
        else:
            x = self.blocks4(self.blocks3(self.blocks2(self.blocks1(x))))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from the last feature map; the pooled (and projected) vector with ``pre_logits``."""
        if self.global_pool == "avg":
            x = self.projection(F.adaptive_avg_pool2d(x, 1).flatten(1))
        if pre_logits:
            return x
        return self._logits(x)

    def _logits(self, x: torch.Tensor):
        """Dropout and the head(s); with distillation, training returns both outputs and eval their mean."""
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        if not hasattr(self, "head_dist"):
            return self.head(x)
        out, out_dist = self.head(x), self.head_dist(x)
        if not torch.jit.is_scripting() and self.training:
            return out, out_dist
        return (out + out_dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    @property
    def texture_dim(self) -> int:
        """Size of the :meth:`forward_texture` vector: the channels of the stages in ``TEXTURE_STAGES``."""
        return sum(self.feature_info[i]["num_chs"] for i in TEXTURE_STAGES)

    def forward_texture(self, x: torch.Tensor, with_logits: bool = False):
        """The texture style vector (:func:`texture_statistics` of the maps of stages ``TEXTURE_STAGES``); with
        ``with_logits``, ``(vector, logits)`` from the same pass. Works with any weights and any loss."""
        if not with_logits:
            return texture_statistics(self.forward_intermediates(x, list(TEXTURE_STAGES), intermediates_only=True))
        last, maps = self.forward_intermediates(x, list(TEXTURE_STAGES))
        return texture_statistics(maps), self.forward_head(last)

    @torch.no_grad()
    def fuse(self) -> "LSNet":
        """Fold every foldable BatchNorm into its neighbour for inference, in place (call in eval mode).

        Uses timm's ``reparameterize_model`` (children with ``fuse()``); the BatchNorm after SKA stays, so outputs
        are equal. Returns the model.
        """
        return reparameterize_model(self, inplace=True)


TEXTURE_STAGES = (0, 1, 2)


def texture_statistics(maps: list[torch.Tensor]) -> torch.Tensor:
    """The texture style vector of feature maps: per (N, C, H, W) map, the standard deviation of every channel over
    the image (how strongly each filter's response varies: strokes, hatching, grain, the statistics neural style
    transfer matches), centred over the channels and L2-normalised; the maps' parts concatenated, L2-normalised."""
    parts = []
    for feature_map in maps:
        # The standard deviation over positions, written with means over (H, W): an exported ONNX graph then keeps
        # the channel count static (flatten + std leave it symbolic).
        centred = feature_map.float() - feature_map.float().mean((2, 3), keepdim=True)
        spread = centred.square().mean((2, 3)).sqrt()
        parts.append(F.normalize(spread - spread.mean(1, keepdim=True), dim=1))
    return F.normalize(torch.cat(parts, 1), dim=1)


def _check_pool(global_pool: str, num_classes: int) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    if not global_pool and num_classes > 0:
        raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier works on pooled vectors")
    return global_pool


CHECKPOINT_STATE_KEYS = ("model", "model_ema", "state_dict", "state_dict_ema")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None, prefer_ema: bool = False) -> dict:
    """Return the bare state_dict of a checkpoint (official LSNet or artist scripts) with wrapper prefixes removed.

    Accepts a bare state_dict or a dict holding it under ``model``, ``model_ema`` or ``state_dict``;
    strips ``module.`` (DDP/DataParallel) and ``_orig_mod.`` (torch.compile) prefixes (timm's ``clean_state_dict``).
    The official distilled weights loaded into a model without a distillation head lose ``head_dist.*``.
    """
    keys = ("model_ema", "model", "state_dict_ema", "state_dict") if prefer_ema else CHECKPOINT_STATE_KEYS
    for key in keys:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    state_dict = clean_state_dict(state_dict)
    if model is not None and not hasattr(model, "head_dist"):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head_dist.")}
    return state_dict


def backbone_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """:func:`checkpoint_filter_fn` without the heads and projection, checked to hold all of ``model``'s backbone.

    The pretrained filter of the artist models: their heads and projection always start fresh. The first
    convolution may have another number of input channels (``in_chans``): timm adapts it after this filter.
    """
    state_dict = {k: v for k, v in checkpoint_filter_fn(state_dict).items() if not k.startswith(HEAD_PREFIXES)}
    own = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    first_conv = f"{FIRST_CONV}.weight"

    def fits(key: str) -> bool:
        theirs, ours = state_dict[key].shape, own[key]
        return theirs == ours or (key == first_conv and theirs[:1] + theirs[2:] == ours[:1] + ours[2:])

    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and not fits(k)]
    if missing or unexpected or mismatched:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise ValueError(f"the weights are not an LSNet backbone of {arch}: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(mismatched)} mismatched keys "
                         f"(first: {(missing + unexpected + mismatched)[0]})")
    return state_dict


def load_pretrained_backbone(model: LSNet, path: str | os.PathLike | None = None) -> None:
    """Initialise ``model``'s stem and stages from the official ImageNet weights of its size; the heads and
    projection stay fresh.

    ``path``: a local copy of the weights (e.g. ``lsnet_t.pth`` from https://huggingface.co/jameslahm/lsnet); None
    loads them through timm from the Hugging Face Hub (``model.pretrained_cfg['hf_hub_id']``, cached in the usual
    Hugging Face cache; ``HF_HUB_OFFLINE=1`` uses only the cache). Problems are one-line ``UserError``s.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    from utils import UserError

    cfg = dict(model.pretrained_cfg)
    arch = cfg.get("architecture", "this model")
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"pretrained weights not found: {path}; pass the path of e.g. lsnet_t.pth")
        cfg.update(file=os.fspath(path), hf_hub_id=None, url=None)
    elif not cfg.get("hf_hub_id"):
        raise UserError(f"{arch} has no official pretrained weights; use lsnet_t/s/b(_artist), or --pretrained-path")
    try:
        in_chans = model.get_submodule(FIRST_CONV).in_channels
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=in_chans,
                        filter_fn=backbone_filter_fn, strict=False)
    except LocalEntryNotFoundError:
        hub_id = cfg["hf_hub_id"]
        raise UserError(f"the official weights of {arch} are not in the Hugging Face cache and the Hub cannot be "
                        f"reached: run `huggingface-cli download {hub_id}` where there is network (or copy the "
                        "HF cache), or download the .pth from https://huggingface.co/jameslahm/lsnet and pass "
                        "--pretrained-path FILE") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds pickled objects other than weights and was not loaded; re-save it as a "
                        "plain state_dict") from None
    except ValueError as err:
        raise UserError(f"{path or cfg.get('hf_hub_id')}: {err}") from None


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (4, 4), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": FIRST_CONV, "classifier": "head.l", "license": "mit",
        "paper_ids": "arXiv:2503.23135", "paper_name": "LSNet: See Large, Focus Small", **kwargs,
    }


# The official weights (https://github.com/THU-MIG/lsnet): one Hub repository per variant.
OFFICIAL_HUB_IDS = {name: f"jameslahm/{name}" for name in
                    ("lsnet_t", "lsnet_s", "lsnet_b", "lsnet_t_distill", "lsnet_s_distill", "lsnet_b_distill")}

default_cfgs = generate_default_cfgs({
    **{f"{name}.in1k": _cfg(hf_hub_id=OFFICIAL_HUB_IDS[name]) for name in ("lsnet_t", "lsnet_s", "lsnet_b")},
    **{f"{name}.in1k": _cfg(hf_hub_id=OFFICIAL_HUB_IDS[name], classifier=("head.l", "head_dist.l"))
       for name in ("lsnet_t_distill", "lsnet_s_distill", "lsnet_b_distill")},
})

MODEL_ARGS = {
    "lsnet_t": dict(embed_dim=(64, 128, 256, 384), depth=(0, 2, 8, 10), num_heads=(3, 3, 3, 4)),
    "lsnet_s": dict(embed_dim=(96, 192, 320, 448), depth=(1, 2, 8, 10), num_heads=(3, 3, 3, 4)),
    "lsnet_b": dict(embed_dim=(128, 256, 384, 512), depth=(4, 6, 8, 10), num_heads=(3, 3, 3, 4)),
}


def _create_lsnet(variant: str, pretrained: bool = False, **kwargs) -> LSNet:
    return build_model_with_cfg(LSNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)


@register_model
def lsnet_t(pretrained: bool = False, **kwargs) -> LSNet:
    return _create_lsnet("lsnet_t", pretrained, **{**MODEL_ARGS["lsnet_t"], **kwargs})


@register_model
def lsnet_s(pretrained: bool = False, **kwargs) -> LSNet:
    return _create_lsnet("lsnet_s", pretrained, **{**MODEL_ARGS["lsnet_s"], **kwargs})


@register_model
def lsnet_b(pretrained: bool = False, **kwargs) -> LSNet:
    return _create_lsnet("lsnet_b", pretrained, **{**MODEL_ARGS["lsnet_b"], **kwargs})


@register_model
def lsnet_t_distill(pretrained: bool = False, **kwargs) -> LSNet:
    return _create_lsnet("lsnet_t_distill", pretrained, **{**MODEL_ARGS["lsnet_t"], "distillation": True, **kwargs})


@register_model
def lsnet_s_distill(pretrained: bool = False, **kwargs) -> LSNet:
    return _create_lsnet("lsnet_s_distill", pretrained, **{**MODEL_ARGS["lsnet_s"], "distillation": True, **kwargs})


@register_model
def lsnet_b_distill(pretrained: bool = False, **kwargs) -> LSNet:
    return _create_lsnet("lsnet_b_distill", pretrained, **{**MODEL_ARGS["lsnet_b"], "distillation": True, **kwargs})

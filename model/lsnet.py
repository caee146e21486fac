"""LSNet: "See Large, Focus Small" (CVPR 2025), in timm's model-file style.

Parameter and buffer names follow the official release so its checkpoints load with ``strict=True``.
Every block with fusable BatchNorms has a ``fuse()`` used by ``timm.utils.reparameterize_model`` for inference.
"""

import itertools
from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SqueezeExcite, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .ska import SKA

__all__ = ["LSNet", "Conv2d_BN", "BN_Linear", "checkpoint_filter_fn", "MODEL_ARGS"]


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
        self.cv4 = nn.Conv2d(dim // 2, sks**2 * dim // groups, kernel_size=1)
        self.norm = nn.GroupNorm(num_groups=dim // groups, num_channels=sks**2 * dim // groups)
        self.sks = sks
        self.groups = groups
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.cv3(self.cv2(self.act(self.cv1(x)))))
        w = self.norm(self.cv4(x))
        n, _, h, width = w.shape
        return w.view(n, self.dim // self.groups, self.sks**2, h, width)


class LSConv(nn.Module):
    """LS convolution: LKP predicts weights that SKA applies, then BatchNorm and the residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.lkp = LKP(dim, lks=7, sks=3, groups=8)
        self.ska = SKA()
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.ska(x, self.lkp(x))) + x


@lru_cache(maxsize=64)
def relative_offset_index(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(H*W, H*W) index of |dy| * W + |dx| between every pair of grid positions (cached per size and device).

    Built outside inference mode, so a cached index first made during inference also serves training.
    """
    with torch.inference_mode(False):
        ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        return (ys[:, None] - ys[None, :]).abs() * width + (xs[:, None] - xs[None, :]).abs()


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
        """(num_heads, H*W, H*W) bias for an H x W grid.

        The stored table is indexed by (|dy|, |dx|) on the ``resolution`` grid; for another grid it is resized
        (bicubic) to (H, W) first. At the stored size the index equals ``attention_bias_idxs``.
        """
        if (height, width) == (self.resolution, self.resolution):
            return self.attention_biases[:, self.attention_bias_idxs]
        table = self.attention_biases.view(1, self.num_heads, self.resolution, self.resolution).float()
        table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
        table = table.to(self.attention_biases.dtype).view(self.num_heads, height * width)
        return table[:, relative_offset_index(height, width, table.device)]

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
    """LSNet backbone with a BN+Linear classifier (and an optional distillation head averaged in eval)."""

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
    ):
        super().__init__()
        self.num_classes = num_classes
        self.distillation = distillation
        self.drop_rate = drop_rate
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
        self.head = BN_Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if distillation:
            self.head_dist = BN_Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if "attention_biases" in name}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier head(s) with fresh ones for ``num_classes`` (0 removes them)."""
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.head = BN_Linear(self.num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()
        if self.distillation:
            self.head_dist = BN_Linear(self.num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages: the (N, C, H/64, W/64) feature map before pooling."""
        x = self.patch_embed(x)
        for stage in (self.blocks1, self.blocks2, self.blocks3, self.blocks4):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                from timm.models import checkpoint_seq

                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_backbone(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.ndim == 4:
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if pre_logits:
            return x
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self._classify(x)

    def _classify(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Apply the head(s); with distillation, training returns both outputs and eval their mean."""
        if not self.distillation:
            return self.head(x)
        out, out_dist = self.head(x), self.head_dist(x)
        if self.training and not torch.jit.is_scripting():
            return out, out_dist
        return (out + out_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


CHECKPOINT_STATE_KEYS = ("model", "model_ema", "state_dict", "state_dict_ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None, prefer_ema: bool = False) -> dict:
    """Return the bare state_dict of a checkpoint (official LSNet or artist scripts) with wrapper prefixes removed.

    Accepts a bare state_dict or a dict holding it under ``model``, ``model_ema`` or ``state_dict``;
    strips ``module.`` (DDP/DataParallel) and ``_orig_mod.`` (torch.compile) prefixes, however nested.
    """
    keys = ("model_ema", "model", "state_dict_ema", "state_dict") if prefer_ema else CHECKPOINT_STATE_KEYS
    for key in keys:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    cleaned = {}
    for name, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        cleaned[name] = value
    return cleaned


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (4, 4), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.0.c", "classifier": "head.l", "license": "mit",
        "paper_ids": "arXiv:2503.23135", "paper_name": "LSNet: See Large, Focus Small", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "lsnet_t.in1k": _cfg(),
    "lsnet_s.in1k": _cfg(),
    "lsnet_b.in1k": _cfg(),
    "lsnet_t_distill.in1k": _cfg(classifier=("head.l", "head_dist.l")),
    "lsnet_s_distill.in1k": _cfg(classifier=("head.l", "head_dist.l")),
    "lsnet_b_distill.in1k": _cfg(classifier=("head.l", "head_dist.l")),
})

MODEL_ARGS = {
    "lsnet_t": dict(embed_dim=(64, 128, 256, 384), depth=(0, 2, 8, 10), num_heads=(3, 3, 3, 4)),
    "lsnet_s": dict(embed_dim=(96, 192, 320, 448), depth=(1, 2, 8, 10), num_heads=(3, 3, 3, 4)),
    "lsnet_b": dict(embed_dim=(128, 256, 384, 512), depth=(4, 6, 8, 10), num_heads=(3, 3, 3, 4)),
}


def _create_lsnet(variant: str, pretrained: bool = False, **kwargs) -> LSNet:
    return build_model_with_cfg(LSNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


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

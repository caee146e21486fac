"""LSNet for artist-style recognition: an optional projection to a style-feature space, heads on top of it.

Key names match models saved by the original artist training scripts (``projection.0.bn.*``, ``projection.0.l.*``).
"""

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from .lsnet import MODEL_ARGS, OFFICIAL_HUB_IDS, BN_Linear, LSNet, _cfg, backbone_filter_fn

__all__ = ["LSNetArtist", "ARTIST_MODELS"]


class LSNetArtist(LSNet):
    """LSNet whose pooled feature is (optionally) projected to a style-feature space for clustering and comparison.

    ``head_hidden_size`` is the size of the style vector that ``forward_head(x, pre_logits=True)`` returns;
    ``num_features`` stays the last feature map's channel count.

    Args:
        feature_dim: size of the style feature vector (default: the last stage's embed dim, i.e. no projection).
        use_projection: add the BN+Linear+ReLU projection when ``feature_dim`` differs from the embed dim.
        Other arguments are those of :class:`LSNet`.
    """

    def __init__(self, num_classes: int = 1000, feature_dim: int | None = None, use_projection: bool = True,
                 **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)
        feature_dim = feature_dim or self.num_features
        if feature_dim != self.num_features and not use_projection:
            raise ValueError(
                f"feature_dim={feature_dim} differs from the backbone's {self.num_features} channels and needs the "
                f"projection: drop --no-projection or use --feature-dim {self.num_features}"
            )
        self.use_projection = feature_dim != self.num_features
        if self.use_projection:
            self.projection = nn.Sequential(BN_Linear(self.num_features, feature_dim), nn.ReLU())
            self.head_hidden_size = feature_dim
            self.reset_classifier(num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False, return_both: bool = False,
                texture: bool = False):
        """Logits. For code written against the original fork (eager Python only; TorchScript and FX see the
        logits path): the style vectors with ``return_features``, ``(features, logits)`` with ``return_both``;
        with ``texture`` those style vectors are :meth:`forward_texture`'s instead of the pooled ones."""
        if not torch.jit.is_scripting():
            # Under FX the flags are graph inputs, not bools: the traced graph is the logits path.
            if not is_fx_symbolic_tracing() and (return_features or return_both):
                if texture:
                    return self.forward_texture(x, with_logits=return_both)
                features = self.forward_head(self.forward_features(x), pre_logits=True)
                return features if return_features else (features, self._logits(features))
        return self.forward_head(self.forward_features(x))


ARTIST_MODEL_ARGS = {
    "lsnet_t_artist": MODEL_ARGS["lsnet_t"],
    "lsnet_s_artist": MODEL_ARGS["lsnet_s"],
    "lsnet_b_artist": MODEL_ARGS["lsnet_b"],
    "lsnet_l_artist": dict(embed_dim=(160, 320, 480, 640), depth=(6, 8, 12, 14), num_heads=(4, 4, 4, 4)),
    "lsnet_xl_artist": dict(embed_dim=(192, 384, 576, 768), depth=(8, 12, 16, 20), num_heads=(6, 6, 6, 6)),
    "lsnet_xl_artist_448": dict(embed_dim=(192, 384, 576, 768), depth=(8, 12, 16, 20), num_heads=(6, 6, 6, 6),
                                img_size=448),
}
ARTIST_MODELS = tuple(ARTIST_MODEL_ARGS)

# t/s/b: pretrained=True initialises the backbone from the official ImageNet weights of that size (heads fresh).
default_cfgs = generate_default_cfgs({
    **{f"lsnet_{size}_artist.in1k": _cfg(hf_hub_id=OFFICIAL_HUB_IDS[f"lsnet_{size}"]) for size in "tsb"},
    "lsnet_l_artist.untrained": _cfg(),
    "lsnet_xl_artist.untrained": _cfg(),
    "lsnet_xl_artist_448.untrained": _cfg(input_size=(3, 448, 448), pool_size=(7, 7)),
})


def _create_artist(variant: str, pretrained: bool = False, **kwargs) -> LSNetArtist:
    model_args = {**ARTIST_MODEL_ARGS[variant], **kwargs}
    return build_model_with_cfg(LSNetArtist, variant, pretrained, pretrained_filter_fn=backbone_filter_fn,
                                pretrained_strict=False,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **model_args)


@register_model
def lsnet_t_artist(pretrained: bool = False, **kwargs) -> LSNetArtist:
    return _create_artist("lsnet_t_artist", pretrained, **kwargs)


@register_model
def lsnet_s_artist(pretrained: bool = False, **kwargs) -> LSNetArtist:
    return _create_artist("lsnet_s_artist", pretrained, **kwargs)


@register_model
def lsnet_b_artist(pretrained: bool = False, **kwargs) -> LSNetArtist:
    return _create_artist("lsnet_b_artist", pretrained, **kwargs)


@register_model
def lsnet_l_artist(pretrained: bool = False, **kwargs) -> LSNetArtist:
    return _create_artist("lsnet_l_artist", pretrained, **kwargs)


@register_model
def lsnet_xl_artist(pretrained: bool = False, **kwargs) -> LSNetArtist:
    return _create_artist("lsnet_xl_artist", pretrained, **kwargs)


@register_model
def lsnet_xl_artist_448(pretrained: bool = False, **kwargs) -> LSNetArtist:
    return _create_artist("lsnet_xl_artist_448", pretrained, **kwargs)

"""LSNet for artist-style recognition: an optional projection to a style-feature space, heads on top of it.

Key names match models saved by the original artist training scripts (``projection.0.bn.*``, ``projection.0.l.*``).
"""

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .lsnet import MODEL_ARGS, BN_Linear, LSNet, _cfg, checkpoint_filter_fn

__all__ = ["LSNetArtist", "ARTIST_MODELS"]


class LSNetArtist(LSNet):
    """LSNet whose pooled feature is (optionally) projected to ``feature_dim`` for clustering and comparison.

    Args:
        feature_dim: size of the style feature vector (default: the last stage's embed dim, i.e. no projection).
        use_projection: add the BN+Linear+ReLU projection when ``feature_dim`` differs from the embed dim.
        Other arguments are those of :class:`LSNet`.
    """

    def __init__(self, num_classes: int = 1000, feature_dim: int | None = None, use_projection: bool = True,
                 **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)
        backbone_dim = self.num_features
        feature_dim = feature_dim or backbone_dim
        if feature_dim != backbone_dim and not use_projection:
            raise ValueError(
                f"feature_dim={feature_dim} differs from the backbone's {backbone_dim} channels and needs the "
                f"projection: drop --no-projection or use --feature-dim {backbone_dim}"
            )
        self.backbone_dim = backbone_dim
        self.use_projection = feature_dim != backbone_dim
        if self.use_projection:
            self.projection = nn.Sequential(BN_Linear(backbone_dim, feature_dim), nn.ReLU())
        else:
            self.projection = nn.Identity()
        self.feature_dim = self.num_features = self.head_hidden_size = feature_dim
        if feature_dim != backbone_dim:
            self.reset_classifier(num_classes)

    def pool_and_project(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Global average pool of the last stage's map, then the projection: the style feature vector."""
        return self.projection(F.adaptive_avg_pool2d(feature_map, 1).flatten(1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Style feature vectors (N, feature_dim) used for clustering and comparison."""
        return self.pool_and_project(self.forward_backbone(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from feature vectors (or from a last-stage feature map, pooled and projected first)."""
        if x.ndim == 4:
            x = self.pool_and_project(x)
        if pre_logits:
            return x
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self._classify(x)

    def forward(self, x: torch.Tensor, return_features: bool = False, return_both: bool = False):
        """Logits; the feature vectors with ``return_features``; ``(features, logits)`` with ``return_both``."""
        features = self.forward_features(x)
        if return_features:
            return features
        logits = self.forward_head(features)
        return (features, logits) if return_both else logits


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

default_cfgs = generate_default_cfgs({
    **{f"{name}.untrained": _cfg() for name in ARTIST_MODELS if name != "lsnet_xl_artist_448"},
    "lsnet_xl_artist_448.untrained": _cfg(input_size=(3, 448, 448), pool_size=(7, 7)),
})


def _create_artist(variant: str, pretrained: bool = False, **kwargs) -> LSNetArtist:
    model_args = {**ARTIST_MODEL_ARGS[variant], **kwargs}
    return build_model_with_cfg(LSNetArtist, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **model_args)


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

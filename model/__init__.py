"""LSNet models. Importing this package registers every image model with timm (``timm.create_model("lsnet_t")``);
the glance-and-focus models (an image pair in) are created by :func:`create_glance_focus` instead."""

from .glance_focus import GF_MODELS, GlanceFocus, create_glance_focus
from .lsnet import LSNet, backbone_filter_fn, checkpoint_filter_fn, load_pretrained_backbone
from .lsnet_artist import ARTIST_MODELS, LSNetArtist
from .ska import SKA

__all__ = ["ARTIST_MODELS", "GF_MODELS", "GlanceFocus", "LSNet", "LSNetArtist", "SKA", "backbone_filter_fn",
           "checkpoint_filter_fn", "create_glance_focus", "load_pretrained_backbone"]

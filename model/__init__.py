"""LSNet models. Importing this package registers every variant with timm (``timm.create_model("lsnet_t")``)."""

from .glance_focus import GlanceFocus
from .lsnet import LSNet, backbone_filter_fn, checkpoint_filter_fn, load_pretrained_backbone
from .lsnet_artist import ARTIST_MODELS, LSNetArtist
from .ska import SKA

__all__ = ["ARTIST_MODELS", "GlanceFocus", "LSNet", "LSNetArtist", "SKA", "backbone_filter_fn", "checkpoint_filter_fn",
           "load_pretrained_backbone"]

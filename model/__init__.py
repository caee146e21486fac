"""LSNet models. Importing this package registers every variant with timm (``timm.create_model("lsnet_t")``)."""

from .glance_focus import GlanceFocus
from .lsnet import LSNet, checkpoint_filter_fn
from .lsnet_artist import ARTIST_MODELS, LSNetArtist
from .ska import SKA

__all__ = ["ARTIST_MODELS", "GlanceFocus", "LSNet", "LSNetArtist", "SKA", "checkpoint_filter_fn"]

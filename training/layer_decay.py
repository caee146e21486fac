"""Layer-wise learning-rate decay (``--layer-decay``) through timm's parameter groups.

A model with a ``group_matcher`` uses timm's own grouping; LSNet models without one are grouped here by stage: the
stem, ``blocks2``, ``blocks3``, ``blocks4``, then the head (and projection), each earlier group learning
``layer_decay`` times slower than the next.
"""

from collections.abc import Iterator

from timm.optim import param_groups_layer_decay
from torch import nn

__all__ = ["LSNET_GROUPS", "layer_decay_groups"]

# timm group_matcher syntax: the stem first, then the stages blocksK in order; the rest (head) comes last.
LSNET_GROUPS = {"stem": r"^patch_embed", "blocks": [(r"^blocks(\d+)\.", None)]}


class _Grouped:
    """A view of a model that answers timm's ``group_matcher`` with :data:`LSNET_GROUPS`."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def group_matcher(self, coarse: bool = False) -> dict:
        return LSNET_GROUPS


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with ``lr_scale`` = ``layer_decay`` ** (depth from the head); no decay on biases / norms."""
    no_decay = set(getattr(model, "no_weight_decay", set)())
    grouped = model if hasattr(model, "group_matcher") else _Grouped(model)
    return param_groups_layer_decay(grouped, weight_decay=weight_decay, layer_decay=layer_decay,
                                    no_weight_decay_list=no_decay)

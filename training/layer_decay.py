"""Layer-wise learning-rate decay (``--layer-decay``) through timm's parameter groups.

LSNet has four stages of up to ten blocks each; decaying per block would make the stem learn ``layer_decay ** 27``
times slower than the head, so the decay steps per stage: the model's coarse ``group_matcher`` (the stem,
``blocks1`` .. ``blocks4``, then the head and projection), each earlier group learning ``layer_decay`` times slower
than the next.
"""

from collections.abc import Iterator

from timm.optim import param_groups_layer_decay
from torch import nn

__all__ = ["layer_decay_groups"]


class _Stages:
    """A view of a model whose ``group_matcher`` is the model's coarse (per stage) one, what timm's grouping asks."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def group_matcher(self, coarse: bool = False) -> dict:
        return self.model.group_matcher(coarse=True)


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with ``lr_scale`` = ``layer_decay`` ** (stages from the head); no decay on biases / norms."""
    no_decay = set(getattr(model, "no_weight_decay", set)())
    return param_groups_layer_decay(_Stages(model), weight_decay=weight_decay, layer_decay=layer_decay,
                                    no_weight_decay_list=no_decay)

"""The model variants that ``speed.py`` and the benchmark compare: a timm model name with an optional tag,
``name:tag``, which picks the SKA implementation, BatchNorm fusion and compiling (see :data:`VARIANTS`)."""

import timm
from timm.utils import reparameterize_model
from torch import nn

import model  # noqa: F401  (registers the LSNet models with timm)
from model.ska import IMPLS, SKA
from utils import UserError

__all__ = ["VARIANTS", "build_model", "parse_entry", "prepare_model", "set_ska_impl"]

# tag -> (SKA implementation to force or None for the model's default, fuse BatchNorms for inference,
#         compile for inference)
VARIANTS: dict[str, tuple[str | None, bool, bool]] = {
    "fused": (None, True, False),
    "compiled": (None, True, True),
    "unfused": (None, False, False),
    "naive": ("reference", False, False),
    "torch": ("torch", True, False),
    "triton": ("triton", True, False),
}


def parse_entry(spec: str) -> tuple[str, str]:
    """``"name[:tag]"`` -> ``(name, tag)``; the tag defaults to ``fused``."""
    name, _, tag = spec.strip().partition(":")
    tag = tag or "fused"
    if tag not in VARIANTS:
        raise UserError(f"unknown variant tag {tag!r} in {spec!r}; use one of {', '.join(VARIANTS)}")
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r} in {spec!r}; use a timm model name such as lsnet_t_artist")
    return name, tag


def set_ska_impl(net: nn.Module, impl: str) -> int:
    """Replace every :class:`model.ska.SKA` module of ``net`` by ``SKA(impl)``; return how many were replaced."""
    if impl not in IMPLS:
        raise ValueError(f"unknown SKA impl {impl!r}, expected one of {IMPLS}")
    slots = [(parent, name) for parent in net.modules() for name, child in parent.named_children()
             if isinstance(child, SKA)]
    for parent, name in slots:
        setattr(parent, name, SKA(impl))
    return len(slots)


def prepare_model(net: nn.Module, tag: str = "fused", train: bool = False) -> nn.Module:
    """Put ``net`` in train or eval mode, force the SKA implementation of ``tag`` and, for inference, fuse it."""
    impl, fuse, _ = VARIANTS[tag]
    if impl is not None and set_ska_impl(net, impl) == 0:
        raise UserError(f"variant {tag!r} sets the SKA implementation, but the model has no SKA layer")
    net.train(train)
    if fuse and not train:
        reparameterize_model(net, inplace=True)
    return net


def build_model(name: str, tag: str = "fused", train: bool = False, num_classes: int = 1000) -> nn.Module:
    """Create the timm model ``name`` (random weights) and :func:`prepare_model` it for the variant ``tag``."""
    return prepare_model(timm.create_model(name, num_classes=num_classes), tag, train)

"""The glance-and-focus dataset: ``((glance tensor, focus tensor), label)`` from a prepared ``train/`` or ``val/``."""

import os
from pathlib import Path

import torch
from torchvision.transforms import functional as TF

from data.datasets import RobustImageFolder
from data.glance_views import View, make_view, to_tensor

__all__ = ["GlanceFocusTransform", "build_gf_dataset", "collate_views"]


class GlanceFocusTransform:
    """PIL image -> (glance tensor, focus tensor): a random square window and flip in training, centred otherwise."""

    def __init__(self, glance_size: int, focus_resolution: int, train: bool):
        self.glance_size, self.focus_resolution, self.train = glance_size, focus_resolution, train

    def view(self, image) -> View:
        return make_view(image, self.glance_size, self.focus_resolution, "random" if self.train else "center")

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        view = self.view(image)
        glance, focus = to_tensor(view.glance), to_tensor(view.focus)
        if self.train and torch.rand(()) < 0.5:
            glance, focus = glance.flip(-1), focus.flip(-1)
        return glance, focus


def build_gf_dataset(data_path: str | os.PathLike, split: str, classes: list[str], glance_size: int,
                     focus_resolution: int, verbose: bool = False, train: bool | None = None) -> RobustImageFolder:
    """``data_path/split`` read with :class:`GlanceFocusTransform`: training views when ``train`` (default: for the
    ``train`` split), evaluation views otherwise."""
    train = split == "train" if train is None else train
    transform = GlanceFocusTransform(glance_size, focus_resolution, train=train)
    return RobustImageFolder(Path(data_path) / split, classes=classes, transform=transform, allow_empty=True,
                             verbose=verbose)


def collate_views(batch: list[tuple[tuple[torch.Tensor, torch.Tensor], int]]
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A batch of views: the glances stacked, the square focus windows centre-cropped to the smallest side in the
    batch (at ``--focus-resolution 0`` each image keeps its native size, so the windows differ), the labels."""
    side = min(focus.shape[-1] for (_, focus), _ in batch)
    focus = [TF.center_crop(focus, [side, side]) for (_, focus), _ in batch]
    glance = torch.stack([glance for (glance, _), _ in batch])
    return (glance, torch.stack(focus)), torch.tensor([label for _, label in batch])


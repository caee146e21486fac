"""DeiT III "ThreeAugment": random crop + flip, then one of grayscale / solarization / Gaussian blur, colour jitter."""

import random

from PIL import Image, ImageFilter, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

__all__ = ["GaussianBlur", "Solarization", "three_augment_transform"]


class GaussianBlur:
    """Blur a PIL image with probability ``p`` and a radius drawn uniformly from [radius_min, radius_max]."""

    def __init__(self, p: float = 0.1, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class Solarization:
    """Invert the pixels above 128 of a PIL image with probability ``p``."""

    def __init__(self, p: float = 0.2):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def three_augment_transform(input_size: int, color_jitter: float | None = 0.4) -> transforms.Compose:
    """The DeiT III training transform (bicubic random-resized crop, no RandAugment, no random erasing)."""
    steps = [
        RandomResizedCropAndInterpolation(input_size, scale=(0.08, 1.0), interpolation="bicubic"),
        transforms.RandomHorizontalFlip(),
        transforms.RandomChoice([transforms.Grayscale(num_output_channels=3), Solarization(p=1.0),
                                 GaussianBlur(p=1.0)]),
    ]
    if color_jitter:
        steps.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)

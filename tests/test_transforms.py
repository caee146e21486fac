"""data.transforms: the fused resize + crop and batched normalisation agree with timm's / torchvision's pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from data.transforms import ResizeCenterCrop, build_inference_transform, normalize_batch

SIZES = [(256, 256), (384, 512), (512, 300), (100, 80), (257, 1000), (224, 224), (256, 293), (1203, 901), (31, 47)]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with grain: edges and flat areas, like a photo or a painting scan."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8))


def level_difference(a: Image.Image, b: Image.Image) -> np.ndarray:
    assert a.size == b.size and a.mode == b.mode
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))


@pytest.mark.parametrize("interpolation", [InterpolationMode.BICUBIC, InterpolationMode.BILINEAR,
                                           InterpolationMode.LANCZOS])
@pytest.mark.parametrize(("scale_size", "max_mean"), [(256, 0.01), ((256, 256), 0.01), ((240, 300), 0.5)])
def test_resize_center_crop_matches_resize_then_crop(interpolation, scale_size, max_mean):
    fused = ResizeCenterCrop(scale_size, (224, 224), interpolation)
    two_steps = transforms.Compose([transforms.Resize(scale_size, interpolation), transforms.CenterCrop(224)])
    for seed, (width, height) in enumerate(SIZES):
        image = photo(width, height, seed)
        difference = level_difference(fused(image), two_steps(image))
        # same sampling positions and filter: only the rounding between PIL's two passes (and their order) differ
        assert difference.max() <= 12 and difference.mean() < max_mean, (width, height)


def test_resized_size_is_torchvision_s():
    for width, height in SIZES:
        image = Image.new("RGB", (width, height))
        for scale_size in (256, 57, (100, 80)):
            expected = transforms.Resize(scale_size)(image).size
            assert ResizeCenterCrop(scale_size, (32, 32)).resized_size(width, height) == expected


def test_crop_larger_than_the_resized_image_pads_like_center_crop():
    # crop_pct > 1: the crop is larger than the resized image, so torchvision pads with black
    image = photo(300, 200, seed=3)
    fused = ResizeCenterCrop(200, (224, 224))
    two_steps = transforms.Compose([transforms.Resize(200, InterpolationMode.BICUBIC), transforms.CenterCrop(224)])
    assert level_difference(fused(image), two_steps(image)).max() == 0


@pytest.mark.parametrize(("crop_mode", "interpolation"),
                         [("center", "bicubic"), ("squash", "bilinear"), ("border", "bicubic"), ("center", "nearest")])
def test_inference_transform_is_timm_eval_transform(crop_mode, interpolation):
    config = {"input_size": (3, 96, 96), "crop_pct": 0.9, "crop_mode": crop_mode, "interpolation": interpolation,
              "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    fast = build_inference_transform(config)
    reference = create_transform(**config, is_training=False)
    fused = isinstance(fast.transforms[0], ResizeCenterCrop)
    assert fused == (crop_mode != "border" and interpolation != "nearest")
    for seed, (width, height) in enumerate(SIZES):
        image = photo(width, height, seed)
        output = fast(image)
        assert output.dtype == torch.uint8 and output.shape == (3, 96, 96)
        normalized = normalize_batch(output[None], config["mean"], config["std"])[0]
        expected = reference(image)
        # rounding differences of the resize only (see above), in uint8 levels after undoing the normalisation
        levels = (normalized - expected).abs() * torch.tensor(config["std"]).view(3, 1, 1) * 255
        assert levels.max() <= 12.01 and levels.mean() < 0.05


def test_normalize_batch_is_to_tensor_then_normalize():
    images = [photo(64, 48, seed) for seed in range(3)]
    batch = torch.stack([transforms.functional.pil_to_tensor(im) for im in images])
    reference = torch.stack([
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(transforms.functional.to_tensor(im))
        for im in images
    ])
    normalized = normalize_batch(batch, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, reference, rtol=0, atol=1e-6)
    assert normalize_batch(reference, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) is reference  # float: as given

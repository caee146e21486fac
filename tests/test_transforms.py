"""data.transforms, the one evaluation preprocessing: its resize + crop and batched normalisation agree with timm's /
torchvision's pipeline, and validation, inference, the ONNX numpy mirror and glance-and-focus all give its pixels."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import model  # noqa: F401  (registers the models)
from artifacts.model_folder import build_config
from data.datasets import build_transform
from data.glance_views import make_view, to_tensor
from data.resize import IMAGENET_MEAN, IMAGENET_STD
from data.transforms import ResizeCenterCrop, build_inference_transform, eval_data_config, normalize_batch
from inference.loading import build_eval_transform
from inference.onnx_model import eval_preprocess, normalize_uint8
from training.config import AugmentConfig
from utils import UserError

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


def two_passes(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """The whole image resized by Pillow's two passes, horizontal first (``Image.resize`` picks the order by cost)."""
    return image.resize((size[0], image.height), resample).resize(size, resample)


@pytest.mark.parametrize("interpolation", [InterpolationMode.BICUBIC, InterpolationMode.BILINEAR,
                                           InterpolationMode.LANCZOS])
@pytest.mark.parametrize("scale_size", [256, (256, 256), (240, 300)])
def test_resize_center_crop_is_resize_then_crop(interpolation, scale_size):
    fused = ResizeCenterCrop(scale_size, (224, 224), interpolation)
    for seed, (width, height) in enumerate(SIZES):
        image = photo(width, height, seed)
        resized = two_passes(image, fused.resized_size(width, height), fused.resample)
        difference = level_difference(fused(image), transforms.CenterCrop(224)(resized))
        # same sampling positions, filter and pass order: only the float32 crop box of Pillow's resample rounds
        assert difference.max() <= 2 and difference.mean() < 0.1, (width, height)
        if np.array_equal(np.asarray(transforms.Resize(scale_size, interpolation)(image)), np.asarray(resized)):
            two_steps = transforms.Compose([transforms.Resize(scale_size, interpolation), transforms.CenterCrop(224)])
            assert level_difference(fused(image), two_steps(image)).max() <= 2, (width, height)


def test_resize_center_crop_does_not_depend_on_the_region_resampled():
    """Pure noise, where the rounding between the passes shows most: resampling only the cropped region (whose
    cheaper pass order Pillow would pick differently from the whole image's) gives the whole image's pixels."""
    rng = np.random.default_rng(0)
    for width, height in [(300, 400), (257, 1000), (256, 293), (3, 301)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for scale_size in (256, (256, 256), (240, 300)):
            fused = ResizeCenterCrop(scale_size, (224, 224))
            whole = two_passes(image, fused.resized_size(width, height), fused.resample)
            assert level_difference(fused(image), transforms.CenterCrop(224)(whole)).max() <= 2, (width, height)


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


@pytest.mark.parametrize(("crop_mode", "interpolation"), [("center", "bicubic"), ("squash", "bilinear")])
def test_inference_transform_is_timm_eval_transform(crop_mode, interpolation):
    config = {"input_size": (3, 96, 96), "crop_pct": 0.9, "crop_mode": crop_mode, "interpolation": interpolation,
              "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    fast = build_inference_transform(config)
    reference = create_transform(**config, is_training=False)
    validation = build_inference_transform(config, normalize=True)
    for seed, (width, height) in enumerate(SIZES):
        image = photo(width, height, seed)
        output = fast(image)
        assert output.dtype == torch.uint8 and output.shape == (3, 96, 96)
        normalized = normalize_batch(output[None], config["mean"], config["std"])[0]
        assert torch.equal(validation(image), normalized)  # per image: the same arithmetic as per batch
        expected = reference(image)
        # rounding differences only, largest where Pillow resizes the whole image vertical pass first (see above)
        levels = (normalized - expected).abs() * torch.tensor(config["std"]).view(3, 1, 1) * 255
        assert levels.max() <= 12.01 and levels.mean() < 0.25


@pytest.mark.parametrize(("key", "value"), [("crop_mode", "border"), ("interpolation", "nearest")])
def test_unsupported_eval_settings_are_one_line_errors(key, value):
    config = {"input_size": (3, 96, 96), "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic", key: value}
    with pytest.raises(UserError, match=f"{key} '{value}' is not supported") as err:
        build_inference_transform(config)
    assert "\n" not in str(err.value)


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


# ------------------------------------------------------------------------------ one evaluation preprocessing


def eval_images() -> list[Image.Image]:
    """Photo-like images and pure noise (where resampling rounding shows most), square and not, up and down."""
    rng = np.random.default_rng(1)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(300, 400), (97, 61)]]
    return [photo(w, h, seed) for seed, (w, h) in enumerate([(256, 293), (1203, 901), (31, 47)])] + noise


@pytest.mark.parametrize("squash", [False, True])
def test_validation_inference_and_onnx_preprocessing_are_one(squash):
    """Training's validation transform, inference's (model folder config.json -> timm data config -> transform +
    batched normalisation) and the numpy mirror of exported ONNX folders give the same float32 inputs, exactly."""
    net = timm.create_model("lsnet_t_artist", num_classes=3, depth=(0, 1, 1, 1))
    config = build_config("lsnet_t_artist", net, 64, squash=squash)
    transform, data_config = build_eval_transform(net, 64, config)
    validation = build_transform(False, AugmentConfig().transform(64, squash=squash))
    for image in eval_images():
        pixels = transform(image)
        mirrored = eval_preprocess(image, 64, config)
        assert np.array_equal(pixels.numpy(), mirrored)
        inputs = normalize_batch(pixels[None], data_config["mean"], data_config["std"])
        assert torch.equal(validation(image), inputs[0])
        assert np.array_equal(normalize_uint8(mirrored[None], config["mean"], config["std"]), inputs.numpy())


def test_torch_free_defaults_are_timm_s():
    assert (IMAGENET_MEAN, IMAGENET_STD) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert eval_data_config(224)["crop_pct"] == timm.get_pretrained_cfg("lsnet_t_artist").crop_pct


def test_glance_is_the_squash_eval_preprocessing():
    """Glance-and-focus reads its glance through the same resample and normalisation as every other model."""
    image = eval_images()[0]
    view = make_view(image, 48, 96)
    squashed = build_inference_transform(eval_data_config(48, squash=True), normalize=True)(view.focus)
    assert torch.equal(to_tensor(view.glance), squashed)

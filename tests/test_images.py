"""The one image loader: conversions to upright RGB, and the rejection reasons of broken files."""

import io

import imagegen as gen
import numpy as np
import pytest
from PIL import Image

from data.images import ImageLoadError, is_image_file, load_first_readable, load_image, to_rgb, verify_image


def pixel(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return img.getpixel((x, y))


def assert_close(actual, expected, tol=3):
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True)), (actual, expected)


def test_rgb_png_is_loaded_exactly(tmp_path):
    path = gen.noise_image(tmp_path / "a.png", (20, 10), seed=3)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (20, 10)
    expected = np.random.default_rng(3).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_loads_from_a_file_object(tmp_path):
    path = gen.cmyk_jpeg(tmp_path / "c.jpg")
    img = load_image(io.BytesIO(path.read_bytes()))
    assert img.mode == "RGB"
    assert_close(pixel(img, 5, 5), gen.RED, tol=8)


def test_palette_transparency_becomes_white_not_black(tmp_path):
    img = load_image(gen.palette_transparent_png(tmp_path / "p.png"))
    assert pixel(img, 2, 2) == gen.WHITE
    assert pixel(img, 30, 2) == gen.RED


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_become_white(tmp_path, mode):
    assert pixel(load_image(gen.rgba_png(tmp_path / "t.png", alpha=0, mode=mode)), 0, 0) == gen.WHITE
    assert pixel(load_image(gen.rgba_png(tmp_path / "o.png", alpha=255, mode=mode)), 0, 0) == (0, 0, 0)
    assert_close(pixel(load_image(gen.rgba_png(tmp_path / "h.png", alpha=128, mode=mode)), 0, 0), (127, 127, 127))


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    img = load_image(gen.exif_rotated_jpeg(tmp_path / "r.jpg"))
    assert img.size == (20, 40)
    assert_close(pixel(img, 10, 5), gen.RED, tol=10)
    assert_close(pixel(img, 10, 35), gen.BLUE, tol=10)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    img = load_image(gen.cmyk_jpeg(tmp_path / "c.jpg"))
    assert img.mode == "RGB"
    assert_close(pixel(img, 5, 5), gen.RED, tol=8)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    with Image.open(gen.gray16_png(tmp_path / "g.png")) as stored:
        assert stored.mode == "I;16"
    assert pixel(load_image(tmp_path / "g.png"), 3, 3) == (128, 128, 128)
    assert pixel(load_image(gen.gray16_png(tmp_path / "d.png", value=4096)), 0, 0) == (16, 16, 16)


def test_16bit_rgb_png(tmp_path):
    assert pixel(load_image(gen.rgb16_png(tmp_path / "c.png")), 0, 0) == (255, 128, 0)


@pytest.mark.parametrize("mode", ["L", "1", "I", "F"])
def test_other_modes_become_rgb(tmp_path, mode):
    value = {"L": 200, "1": 1, "I": 200 * 256, "F": 200.0}[mode]
    path = tmp_path / "x.tiff"
    Image.new(mode, (8, 8), value).save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert pixel(img, 0, 0) == ((255,) * 3 if mode == "1" else (200,) * 3)


def test_animated_gif_gives_first_frame(tmp_path):
    assert pixel(load_image(gen.animated_gif(tmp_path / "a.gif")), 8, 8) == gen.RED


@pytest.mark.parametrize(
    "make, name, category",
    [
        (gen.truncated_jpeg, "t.jpg", "truncated"),
        (gen.empty_file, "e.png", "empty file"),
        (gen.text_file, "n.jpg", "not an image"),
        (gen.bomb_png, "b.png", "too large"),
    ],
)
def test_broken_files_are_rejected_with_reason(tmp_path, make, name, category):
    path = make(tmp_path / name)
    assert verify_image(path).startswith(category + ":")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason.startswith(category) and str(path) in str(info.value)


def test_missing_file_is_unreadable(tmp_path):
    assert verify_image(tmp_path / "missing.png").startswith("unreadable:")


def test_images_over_the_pixel_limit_are_rejected(tmp_path, monkeypatch):
    path = gen.noise_image(tmp_path / "big.png", (40, 40))
    assert verify_image(path) is None
    # 1600 pixels: over the limit but under twice the limit, where PIL itself would only warn.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert verify_image(path).startswith("too large: 40x40")


def test_is_image_file():
    assert is_image_file("a/B.JPG") and is_image_file("x.webp") and is_image_file("y.Tiff")
    assert not is_image_file("a.txt") and not is_image_file("jpg")


def test_load_first_readable_skips_and_warns_once(tmp_path, capsys):
    paths = [gen.noise_image(tmp_path / "0.png"), gen.text_file(tmp_path / "1.png"),
             gen.noise_image(tmp_path / "2.png")]
    warned: set[str] = set()
    for _ in range(2):
        img, used = load_first_readable(1, 3, lambda i: str(paths[i]), warned)
        assert used == 2 and img.size == (32, 24)
    assert capsys.readouterr().out.count("1.png") == 1
    bad = [gen.text_file(tmp_path / f"bad{i}.jpg") for i in range(2)]
    with pytest.raises(ImageLoadError, match="all failed"):
        load_first_readable(0, 2, lambda i: str(bad[i]), warned)


def test_to_rgb_converts_in_memory_images_without_touching_them(tmp_path):
    with Image.open(gen.exif_rotated_jpeg(tmp_path / "r.jpg")) as stored:
        upright = to_rgb(stored)
        assert stored.size == (40, 20)
    assert upright.size == (20, 40)
    palette = Image.open(gen.palette_transparent_png(tmp_path / "p.png"))
    assert pixel(to_rgb(palette), 2, 2) == gen.WHITE and palette.mode == "P"
    palette.close()
    decoded = load_image(gen.exif_rotated_jpeg(tmp_path / "r2.jpg"))  # upright RGB: used as it is, not copied
    assert to_rgb(decoded) is decoded and decoded.size == (20, 40)

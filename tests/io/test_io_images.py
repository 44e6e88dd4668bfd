import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_sartorius.io import images as images_mod
from napari_sartorius.io.images import (
    ImageReadError,
    default_image_dirs,
    find_image,
    image_size,
    read_image,
    read_stack,
    to_uint8_gray,
)


def test_png_gray_roundtrip(tmp_path):
    a = (np.arange(12 * 7) % 256).astype(np.uint8).reshape(12, 7)
    Image.fromarray(a).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.dtype == np.uint8 and out.shape == (12, 7)
    np.testing.assert_array_equal(out, a)
    assert image_size(tmp_path / "g.png") == (12, 7)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_becomes_luminance(tmp_path, mode):
    rgb = np.zeros((4, 5, len(mode)), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    if mode == "RGBA":
        rgb[..., 3] = 7  # alpha is dropped, not multiplied in
    Image.fromarray(rgb, mode).save(tmp_path / "c.png")
    out = read_image(tmp_path / "c.png")
    assert out.shape == (4, 5) and out.dtype == np.uint8
    assert np.all(out == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50))


def test_jpeg(tmp_path):
    a = np.full((16, 16), 120, np.uint8)
    Image.fromarray(a).save(tmp_path / "j.jpg", quality=95)
    out = read_image(tmp_path / "j.jpg")
    assert out.shape == (16, 16) and abs(int(out.mean()) - 120) <= 2


def test_16bit_is_stretched_by_percentiles(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(1000, 3000, size=(50, 60)).astype(np.uint16)
    a[0, 0] = 65535  # a hot pixel must not flatten the contrast
    tifffile.imwrite(tmp_path / "w.tif", a)
    out = read_image(tmp_path / "w.tif")
    assert out.dtype == np.uint8
    assert out.max() == 255 and out.min() == 0
    assert out[1:].std() > 50  # contrast kept
    # 16-bit PNG too
    Image.fromarray(a).save(tmp_path / "w.png")
    np.testing.assert_array_equal(read_image(tmp_path / "w.png"), out)


def test_small_integers_and_unit_floats_are_not_stretched():
    np.testing.assert_array_equal(to_uint8_gray(np.array([[3, 9]], np.uint16)), [[3, 9]])
    np.testing.assert_array_equal(to_uint8_gray(np.array([[0.0, 0.5, 1.0]])), [[0, 128, 255]])
    np.testing.assert_array_equal(to_uint8_gray(np.array([[True, False]])), [[255, 0]])
    assert to_uint8_gray(np.full((3, 3), 4000, np.uint16)).max() == 0  # constant image


def test_float_tiff_outside_unit_range(tmp_path):
    a = np.linspace(-5, 300, 200, dtype=np.float32).reshape(10, 20)
    tifffile.imwrite(tmp_path / "f.tif", a)
    out = read_image(tmp_path / "f.tif")
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[-1, -1] == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotonic


def test_lzw_tiff_without_imagecodecs(tmp_path):
    a = (np.arange(30 * 40) % 251).astype(np.uint8).reshape(30, 40)
    Image.fromarray(a).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tif"), a)


def test_undecodable_compressed_tiff_names_imagecodecs(tmp_path, monkeypatch):
    try:
        import imagecodecs  # noqa: F401

        pytest.skip("imagecodecs is installed: tifffile decodes LZW itself")
    except ImportError:
        pass
    a = np.zeros((8, 8), np.uint8)
    Image.fromarray(a).save(tmp_path / "lzw.tif", compression="tiff_lzw")

    def broken_pil(path, all_frames=False):
        raise ImageReadError("PIL cannot either")

    monkeypatch.setattr(images_mod, "_read_pil", broken_pil)
    with pytest.raises(ImageReadError, match="pip install imagecodecs") as e:
        read_image(tmp_path / "lzw.tif")
    assert "lzw.tif" in str(e.value)


def test_stack_only_from_read_stack(tmp_path):
    s = np.random.default_rng(1).integers(0, 255, (3, 9, 11)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", s)
    out = read_stack(tmp_path / "s.tif")
    assert out.shape == (3, 9, 11)
    np.testing.assert_array_equal(out, s)
    with pytest.raises(ImageReadError, match="read_stack"):
        read_image(tmp_path / "s.tif")
    # a single plane stored as (1, H, W) is a 2-D image; a 2-D image is a stack of one
    tifffile.imwrite(tmp_path / "one.tif", s[:1])
    assert read_image(tmp_path / "one.tif").shape == (9, 11)
    assert read_stack(tmp_path / "one.tif").shape == (1, 9, 11)


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(bad)
    badtif = tmp_path / "bad.tif"
    badtif.write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match="bad.tif"):
        read_image(badtif)
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


def test_find_image(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "images" / "abc.tif")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "abc_labels.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "up.PNG")
    dirs = default_image_dirs(tmp_path / "ann.json")
    assert dirs == [tmp_path, tmp_path / "images"]
    assert find_image("abc", dirs) == tmp_path / "images" / "abc.tif"  # label file never matches
    assert find_image("abc.png", dirs) == tmp_path / "images" / "abc.tif"  # by stem
    assert find_image("train/abc.tif", dirs) == tmp_path / "images" / "abc.tif"
    assert find_image("up", tmp_path) == tmp_path / "up.PNG"
    assert find_image("nothing", dirs) is None
    assert find_image("abc", None) is None

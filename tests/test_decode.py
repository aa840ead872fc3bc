"""Pixels: geometry by hand, quality against Pillow's Lanczos, every awkward file kind."""

import io

import numpy as np
import pytest
from PIL import Image

from prep.decode import decode_resize, output_geometry
from prep.errors import BadImage
from tools.fake_imagenet import awkward_files, class_image, jpeg_bytes
from tools.reference import lanczos_reference, psnr

CAP = 100_000_000


@pytest.fixture(scope="module")
def awkward():
    return awkward_files(np.random.default_rng(1))


def png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_geometry_worked_examples():
    # 500x375: shorter side 375 -> 256, width 500*256/375 = 341.33 -> 341; window left (341-256)//2 = 42
    assert output_geometry(500, 375, 256, "crop") == (341, 256, 42, 0, 256, 256)
    assert output_geometry(375, 500, 256, "crop") == (256, 341, 0, 42, 256, 256)
    assert output_geometry(300, 300, 256, "crop") == (256, 256, 0, 0, 256, 256)
    assert output_geometry(500, 375, 256, "squash") == (256, 256, 0, 0, 256, 256)
    # keep: the whole width up to max_aspect x 256 = 512, cut centrally beyond it
    assert output_geometry(500, 375, 256, "keep") == (341, 256, 0, 0, 341, 256)
    assert output_geometry(375, 500, 256, "keep") == (256, 341, 0, 0, 256, 341)
    assert output_geometry(3000, 300, 256, "keep") == (2560, 256, 1024, 0, 512, 256)
    assert output_geometry(3000, 300, 256, "keep", max_aspect=1.5) == (2560, 256, 1088, 0, 384, 256)


def test_central_crop_of_two_colour_halves():
    # 600x300: left half red, right half blue. Scaled by 256/300 to 512x256, the window is
    # columns 128..383 of the scaled image, whose middle (column 256) is the colour boundary.
    pixels = np.zeros((300, 600, 3), np.uint8)
    pixels[:, :300] = (255, 0, 0)
    pixels[:, 300:] = (0, 0, 255)
    out = decode_resize(png(pixels), 256, "crop", CAP)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert (out[:, :126] == (255, 0, 0)).all()
    assert (out[:, 130:] == (0, 0, 255)).all()


def test_squash_keeps_the_whole_picture():
    pixels = np.zeros((300, 600, 3), np.uint8)
    pixels[:, :150] = (0, 255, 0)  # the left quarter survives only when nothing is cropped
    out = decode_resize(png(pixels), 256, "squash", CAP)
    assert (out[:, :60] == (0, 255, 0)).all() and (out[:, 70:] == 0).all()


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (500, 333), (640, 480), (120, 90)])
def test_jpeg_matches_pillow_lanczos(width, height):
    pixels = class_image(np.random.default_rng(width), 1, 4, width, height)
    data = jpeg_bytes(pixels, 90)
    assert psnr(decode_resize(data, 256, "crop", CAP), lanczos_reference(data)) > 35


@pytest.mark.parametrize("width,height", [(2400, 1800), (1200, 1600)])
def test_large_jpeg_dct_reduced_path_keeps_quality(width, height):
    # Reduced 2x or 4x in the DCT domain before resampling; quality must stay close to Lanczos.
    pixels = class_image(np.random.default_rng(7), 2, 4, width, height)
    data = jpeg_bytes(pixels, 90)
    assert psnr(decode_resize(data, 256, "crop", CAP), lanczos_reference(data)) > 33


def test_squash_matches_pillow_lanczos():
    data = jpeg_bytes(class_image(np.random.default_rng(3), 0, 4, 500, 375), 90)
    assert psnr(decode_resize(data, 224, "squash", CAP), lanczos_reference(data, 224, "squash")) > 35


@pytest.mark.parametrize("name", ["cmyk.JPEG", "palette.png", "alpha.png", "progressive.JPEG", "png_named.JPEG",
                                  "upper_case.JPG"])
def test_awkward_files_match_pillow(awkward, name):
    data = awkward[name]
    assert psnr(decode_resize(data, 256, "crop", CAP), lanczos_reference(data)) > 33


@pytest.mark.parametrize("name", ["no_eoi.JPEG", "extraneous.JPEG"])
def test_repairable_jpegs_decode_like_the_intact_file(awkward, name):
    # Both are the intact JPEG (upper_case.JPG) minus its end marker or plus stray bytes.
    intact = decode_resize(awkward["upper_case.JPG"], 256, "crop", CAP)
    assert (decode_resize(awkward[name], 256, "crop", CAP) == intact).all()


def test_greyscale_sources_give_equal_channels(awkward):
    for name in ("grey.JPEG", "grey16.png"):
        out = decode_resize(awkward[name], 256, "crop", CAP)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all(), name


def test_sixteen_bit_pngs_keep_their_high_byte(awkward):
    # Both 16-bit files hold value * 257, whose high byte is the 8-bit value of the same picture.
    eight_bit = decode_resize(awkward["png_named.JPEG"], 256, "crop", CAP)
    assert psnr(decode_resize(awkward["rgb16.png"], 256, "crop", CAP), eight_bit) > 45
    grey16 = decode_resize(awkward["grey16.png"], 256, "crop", CAP)
    assert psnr(grey16[..., 1], eight_bit[..., 1]) > 45


def test_exif_orientation_is_ignored(awkward):
    out = decode_resize(awkward["exif_rotated.JPEG"], 256, "crop", CAP)
    upright = decode_resize(awkward["upper_case.JPG"], 256, "crop", CAP)  # same pixels, no EXIF
    assert psnr(out, upright) > 40


@pytest.mark.parametrize("name,reason", [("empty.JPEG", "empty"), ("truncated.JPEG", "truncated"),
                                         ("garbage.JPEG", "not an image"), ("bomb.png", "too large")])
def test_unusable_files_raise_bad_image_with_reason(awkward, name, reason):
    with pytest.raises(BadImage, match=reason):
        decode_resize(awkward[name], 256, "crop", CAP)


def test_pixel_cap_applies_to_jpeg_before_decoding():
    data = jpeg_bytes(class_image(np.random.default_rng(0), 0, 4, 500, 375), 90)
    with pytest.raises(BadImage, match="500x375 = 187,500 pixels exceeds the cap of 100,000"):
        decode_resize(data, 256, "crop", 100_000)


def test_truncated_png_is_rejected():
    data = png(class_image(np.random.default_rng(0), 0, 4, 300, 200))
    with pytest.raises(BadImage, match="cannot decode PNG"):
        decode_resize(data[: len(data) // 2], 256, "crop", CAP)


def test_corrupt_cmyk_jpeg_is_rejected_although_pillow_would_load_it(awkward):
    # Pillow ignores libjpeg's warnings; CMYK JPEGs are checked by libjpeg-turbo as strictly as others.
    damaged = bytearray(awkward["cmyk.JPEG"])
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = b"\xff\xd3" * 32  # stray restart markers in the scan
    with pytest.raises(BadImage, match="corrupt JPEG"):
        decode_resize(bytes(damaged), 256, "crop", CAP)


def test_thin_strips_are_cut_to_their_centre_first():
    # 2000 x 100 (20:1): resized whole it would be 5120 x 256; its central 4:1 part gives the
    # same central window (to half a pixel), so it still matches Pillow's full resize.
    pixels = class_image(np.random.default_rng(5), 3, 4, 2000, 100)
    assert psnr(decode_resize(png(pixels), 256, "crop", CAP), lanczos_reference(png(pixels))) > 30
    strip = png(np.full((1, 100_000, 3), 77, np.uint8))  # 1 x 100,000: gigabytes if resized whole
    assert (decode_resize(strip, 256, "crop", CAP) == 77).all()


def test_only_raster_formats_are_opened():
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buffer, "EPS")  # Pillow would run Ghostscript on it
    with pytest.raises(BadImage, match="not an image"):
        decode_resize(buffer.getvalue(), 256, "crop", CAP)

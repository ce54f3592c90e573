"""Safe decoding, smart_resize and encoding of images (data_tools.images)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import pytest
from PIL import Image

# The PIL module holds a copy of the reference smart_resize and imports without torchvision.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from data_tools import images
from data_tools.shards import decode_sample_bytes


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width`x`height` and whose pixel data is a few zero bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("min_pixels,max_pixels", [(65_536, 16_777_216), (4096, 16_384), (3136, 1_003_520)])
def test_smart_resize_matches_transformers(min_pixels: int, max_pixels: int) -> None:
    for h, w in [(1, 1), (64, 64), (17, 300), (960, 1280), (1000, 37), (4000, 3000), (33, 6000), (250, 250)]:
        want = hf_smart_resize(h, w, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
        assert images.smart_resize(h, w, 32, min_pixels, max_pixels) == want, (h, w)


def test_process_image_resizes_to_grid() -> None:
    out = images.process_image(_encode(Image.new("RGB", (300, 200), "red"), "PNG"))
    h, w = images.smart_resize(200, 300)
    assert (out.height, out.width) == (h, w) and h % 32 == 0 and w % 32 == 0
    assert out.grid_thw == [1, h // 16, w // 16] and out.num_tokens == h * w // 1024
    decoded = Image.open(io.BytesIO(out.data))
    assert decoded.format == "JPEG" and decoded.size == (w, h)
    for fmt, pil in [("png", "PNG"), ("webp", "WEBP")]:
        out = images.process_image(
            _encode(Image.new("RGB", (64, 64), "blue"), "PNG"), 4096, 4096, image_format=fmt
        )
        assert Image.open(io.BytesIO(out.data)).format == pil and out.ext == images.IMAGE_FORMATS[fmt][1]


def test_exif_orientation_and_rgb() -> None:
    image = Image.new("RGB", (128, 64), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 128x64 stored image is displayed 64x128
    data = _encode(image, "JPEG", exif=exif.tobytes())
    out = images.process_image(data, 4096, 65_536)
    assert (out.width, out.height) == (64, 128)
    assert out.data != data  # rotated, so re-encoded
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent -> white, not black
    got = images.open_image_safely(_encode(rgba, "PNG"))
    assert got.mode == "RGB" and got.getpixel((5, 5)) == (255, 255, 255)
    grey = images.open_image_safely(_encode(Image.new("L", (32, 32), 7), "PNG"))
    assert grey.mode == "RGB"


def test_plain_jpeg_on_grid_is_stored_as_is() -> None:
    data = _encode(Image.new("RGB", (320, 256), "green"), "JPEG", quality=80)
    assert images.process_image(data).data == data
    cmyk = _encode(Image.new("CMYK", (320, 256), (0, 0, 0, 127)), "JPEG", quality=80)
    assert images.process_image(cmyk).data != cmyk  # on the grid but not RGB: re-encoded


def _palette_grey() -> Image.Image:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([255, 0, 0, 128, 128, 128])
    return image


# Each decoded mode, saved in an allowed format, must keep a mid-grey mid-grey (Pillow's own
# `convert("RGB")` makes 16-bit and 32-bit integers white and floats black).
MID_GREY_CASES = [
    ("I;16", 32896, "PNG", "I;16"),
    ("I", 32896, "TIFF", "I"),
    ("I;16B", 32896, "TIFF", "I;16B"),
    ("F", 0.5, "TIFF", "F"),
    ("L", 128, "PNG", "L"),
    ("LA", (128, 255), "PNG", "LA"),
    ("RGBA", (128, 128, 128, 255), "PNG", "RGBA"),
    ("RGBA", (0, 0, 0, 128), "PNG", "RGBA"),  # half-transparent black on white
    ("P", None, "PNG", "P"),
    ("CMYK", (0, 0, 0, 127), "TIFF", "CMYK"),
    ("CMYK", (0, 0, 0, 127), "JPEG", "CMYK"),
    ("LAB", (137, 128, 128), "TIFF", "LAB"),  # L* 53.6, a* = b* = 0: sRGB 128
    ("YCbCr", (128, 128, 128), "TIFF", "YCbCr"),
]


@pytest.mark.parametrize("mode,value,fmt,opened_mode", MID_GREY_CASES)
def test_modes_keep_mid_grey(mode: str, value: object, fmt: str, opened_mode: str) -> None:
    source = _palette_grey() if mode == "P" else Image.new(mode, (16, 16), value)
    data = _encode(source, fmt)
    opened = Image.open(io.BytesIO(data)).mode
    if mode == "YCbCr" and opened == "RGB":
        pytest.skip("Pillow < 12.3 reads YCbCr TIFFs as RGB: no allowed format opens as YCbCr")
    assert opened == opened_mode  # the path under test is the one taken
    got = images.open_image_safely(data)
    assert got.mode == "RGB"
    assert all(abs(c - 128) <= 1 for c in got.getpixel((8, 8))), got.getpixel((8, 8))


@pytest.mark.parametrize(
    "mode,value",
    [("La", (0, 128)), ("RGBa", (0, 0, 0, 128)), ("PA", (1, 255)), ("HSV", (0, 0, 128))],
)
def test_modes_no_allowed_format_stores_keep_mid_grey(mode: str, value: object) -> None:
    image = Image.new(mode, (4, 4), value)
    if mode == "PA":
        image.putpalette([0, 0, 0, 128, 128, 128])
    assert all(abs(c - 128) <= 1 for c in images.to_rgb(image).getpixel((1, 1)))


def test_integer_and_float_ranges_are_scaled_and_clipped() -> None:
    def grey(mode: str, values: list[float]) -> list[int]:
        image = Image.new(mode, (len(values), 1))
        image.putdata(values)
        return [images.to_rgb(image).getpixel((i, 0))[0] for i in range(len(values))]

    assert grey("I;16", [0, 32896, 65535]) == [0, 128, 255]
    assert grey("I", [-5, 0, 65535, 1_000_000]) == [0, 0, 255, 255]
    assert grey("F", [-1.0, 0.0, 0.5, 1.0, 7.0, float("nan")]) == [0, 0, 128, 255, 255, 0]


def test_transparency_becomes_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert images.open_image_safely(_encode(clear, "PNG")).getpixel((3, 3)) == (255, 255, 255)
    keyed = _palette_grey()
    keyed.info["transparency"] = 1  # the grey entry is the transparent one
    assert images.open_image_safely(_encode(keyed, "PNG")).getpixel((3, 3)) == (255, 255, 255)
    rgb_key = Image.new("RGB", (8, 8), (10, 20, 30))  # PNG tRNS colour key on an RGB image
    assert images.open_image_safely(_encode(rgb_key, "PNG", transparency=(10, 20, 30))).getpixel((3, 3)) == (
        255,
        255,
        255,
    )


def _frames(fmt: str, **kw: object) -> bytes:
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    return _encode(red, fmt, save_all=True, append_images=[blue], **kw)


MULTI_FRAME_CASES = {
    "gif": _frames("GIF", duration=100),
    "webp": _frames("WEBP", lossless=True, duration=100),
    "apng": _frames("PNG", duration=100),
    "tiff": _frames("TIFF"),
}


@pytest.mark.parametrize("kind", sorted(MULTI_FRAME_CASES))
def test_multi_frame_is_rejected_unless_first_frame(kind: str) -> None:
    data = MULTI_FRAME_CASES[kind]
    with pytest.raises(images.ImageError) as info:
        images.open_image_safely(data)
    assert info.value.reason == "multi_frame"
    with pytest.raises(images.ImageError, match="frames"):
        images.process_image(data, 4096, 4096)
    assert images.open_image_safely(data, first_frame=True).getpixel((5, 5)) == (255, 0, 0)
    out = images.process_image(data, 4096, 4096, image_format="png", first_frame=True)
    assert Image.open(io.BytesIO(out.data)).getpixel((5, 5)) == (255, 0, 0)


def test_mpo_camera_jpeg_is_one_image() -> None:
    # Cameras write MPO (a JPEG plus preview or stereo frames): frame 0 is the photo, not an animation.
    data = _encode(
        Image.new("RGB", (320, 256), "red"),
        "MPO",
        save_all=True,
        append_images=[Image.new("RGB", (320, 256))],
    )
    assert images.open_image_safely(data).getpixel((5, 5))[0] > 250
    assert images.process_image(data).data == data  # a plain RGB JPEG on the grid: stored as is


def test_pixel_cap_is_not_limited_by_pillows_own() -> None:
    data = _png_header_only(12_000, 10_000)  # 120 M pixels: over Pillow's 89 M, over our default 100 M
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(images.ImageError) as info:
        images.open_image_safely(data)
    assert info.value.reason == "image_too_large"
    with pytest.raises(images.ImageError) as info:
        images.open_image_safely(data, max_image_pixels=200_000_000)
    assert info.value.reason == "corrupt_image"  # past the cap; the pixel data is only a few bytes
    assert before == Image.MAX_IMAGE_PIXELS


def _sample_tar(image_data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in [("k.json", json.dumps({"images": ["0.jpg"]}).encode()), ("k.0.jpg", image_data)]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def test_train_time_decoding_uses_the_same_allowlist() -> None:
    jpeg = _encode(Image.new("RGB", (32, 32), "red"), "JPEG")
    assert decode_sample_bytes(_sample_tar(jpeg))["images"][0].size == (32, 32)
    for refused, name in [
        (_encode(Image.new("RGB", (8, 8)), "PPM"), "PPM"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "EPS"),
    ]:
        with pytest.raises(images.DisallowedImageFormat) as info:
            decode_sample_bytes(_sample_tar(refused))
        assert info.value.reason == "image_format" and info.value.image_format == name
    with pytest.raises(Exception) as garbage:  # unknown bytes stay a plain decode failure ("corrupt")
        decode_sample_bytes(_sample_tar(b"garbage!" * 4))
    assert not isinstance(garbage.value, images.DisallowedImageFormat)


@pytest.mark.parametrize(
    "data,reason",
    [
        (_png_header_only(50_000, 50_000), "image_too_large"),  # cap checked from the header
        (_encode(Image.new("RGB", (8, 8)), "PPM"), "image_format"),  # not on the allowlist
        (b"not an image at all", "image_format"),
        (_encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:300], "corrupt_image"),  # truncated
        (_png_header_only(64, 64), "corrupt_image"),  # header fine, no pixel data
        (_encode(Image.new("RGB", (2010, 10)), "PNG"), "image_aspect_ratio"),
    ],
)
def test_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(images.ImageError) as info:
        images.process_image(data)
    assert info.value.reason == reason


def test_pixel_cap_is_configurable() -> None:
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(images.ImageError, match="over the cap"):
        images.process_image(data, max_image_pixels=9_999)
    assert images.process_image(data, max_image_pixels=10_000).width > 0

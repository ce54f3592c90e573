"""Safe decoding, smart_resize and encoding of images (data_tools.images)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

# The PIL module holds a copy of the reference smart_resize and imports without torchvision.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from data_tools import images


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

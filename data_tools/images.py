"""Safe image decoding, `smart_resize` to the Qwen3-VL grid, and encoding for shards.

Qwen3-VL: 16-px patches merged 2x2, so one language-model token per 32x32 pixels. Image sides are
rounded to multiples of 32 with the total pixel count kept in [min_pixels, max_pixels]
(transformers' qwen2_vl `smart_resize`, with factor 32); `image_grid_thw = [1, H/16, W/16]`.

Reject reasons raised here (`ImageError.reason`): `image_format` (not on `ALLOWED_FORMATS`),
`image_too_large` (over the source pixel cap), `corrupt_image` (does not decode), `image_aspect_ratio`
(beyond `MAX_ASPECT_RATIO`) and `multi_frame` (animated or multi-page, without `first_frame`).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Qwen3-VL's image processor (`preprocessor_config.json` "size"): shortest_edge / longest_edge.
DEFAULT_MIN_PIXELS = 65_536
DEFAULT_MAX_PIXELS = 16_777_216
PATCH_SIZE = 16
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
MAX_ASPECT_RATIO = 200
# Hard cap on the *source* image, read from the header before decoding (decompression bombs).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Formats we decode; everything else (e.g. EPS, which runs Ghostscript) is refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
EXIF_ORIENTATION = 0x0112
IMAGE_FORMATS = {"jpeg": ("JPEG", "jpg"), "png": ("PNG", "png"), "webp": ("WEBP", "webp")}
# Greyscale modes `to_rgb` reads as 16-bit (PNG/TIFF 16-bit grey opens as `I;16` or `I`).
_INTEGER_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_WHITE = (255, 255, 255, 255)


class ImageError(ValueError):
    """An image that cannot be used; `reason` is the reject reason (`corrupt_image`, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DisallowedImageFormat(ImageError):
    """Bytes in a format Pillow knows but we refuse (EPS would run Ghostscript); reason `image_format`."""

    def __init__(self, image_format: str) -> None:
        super().__init__(
            "image_format", f"{image_format} is not an allowed image format ({', '.join(ALLOWED_FORMATS)})"
        )
        self.image_format = image_format


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target `(height, width)`: multiples of `factor`, pixels in [min, max], aspect ratio kept.

    Same arithmetic as `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class ProcessedImage:
    """An image resized to the Qwen grid and encoded: `ext` is the tar member extension."""

    data: bytes
    ext: str
    width: int
    height: int

    @property
    def grid_thw(self) -> list[int]:
        """`[1, H/16, W/16]` in 16-px patches."""
        return [1, self.height // PATCH_SIZE, self.width // PATCH_SIZE]

    @property
    def num_tokens(self) -> int:
        """Language-model tokens (`<|image_pad|>`) this image takes: H*W/1024."""
        return self.height * self.width // (FACTOR * FACTOR)


def open_image_safely(
    data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *, first_frame: bool = False
) -> Image.Image:
    """Decode `data` into an 8-bit RGB image: format allowlist, pixel cap from the header, one frame
    (frame 0 of an animation or multi-page file only with `first_frame`), EXIF transpose, `to_rgb`.

    Raises `ImageError` with reason `image_format`, `image_too_large`, `multi_frame` or `corrupt_image`.
    """
    with _pixel_limit(max_image_pixels):
        image = _open_allowed(data)
        width, height = image.size
        # Size comes from the header; nothing has been decoded yet.
        if width * height > max_image_pixels:
            raise ImageError(
                "image_too_large", f"{width}x{height} is over the cap of {max_image_pixels} pixels"
            )
        if width <= 0 or height <= 0:
            raise ImageError("corrupt_image", f"image size {width}x{height}")
        try:
            _check_frames(image, first_frame)
            image.load()
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # transposing always copies: only when needed
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # e.g. a GIF frame
            raise ImageError("image_too_large", str(e)) from e
        except Exception as e:  # truncated data, bad EXIF, decoder errors
            raise ImageError("corrupt_image", f"cannot decode image: {e}") from e


def decode_stored_image(data: bytes) -> Image.Image:
    """Decode an image of a shard (already RGB on the grid) under the build's format allowlist.

    Raises `DisallowedImageFormat` for a known format off the allowlist, `ImageError` or Pillow's own
    errors for anything else that does not decode. Pillow's default bomb check applies: stored images
    are resized, far below it.
    """
    image = _open_allowed(data)
    image.load()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, each mode by its real range.

    Integer greyscale (`I;16*`, `I`) is read as 0..65535 and float (`F`) as 0..1, where Pillow's
    `convert` would clip them to white or black; LAB goes through a colour transform (Pillow's
    `convert` reads it as RGB); transparency is composited onto white instead of turning black.
    """
    mode = image.mode
    if mode in _INTEGER_GREY_MODES:
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        return _grey_to_rgb((values * 255 + 32767) // 65535)  # 65535 -> 255, rounded
    if mode == "F":
        values = np.clip(np.nan_to_num(np.asarray(image), nan=0.0), 0.0, 1.0)
        return _grey_to_rgb(np.rint(values * 255))
    if mode == "LAB":
        return _lab_to_srgb().apply(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # Premultiplied La has no direct conversion to RGBA; LA does.
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


@functools.cache
def _lab_to_srgb() -> Any:
    """The littlecms transform from Pillow's LAB (a and b offset by 128) to sRGB."""
    # Imported here: only LAB images need littlecms, and a Pillow built without it still opens the rest.
    from PIL import ImageCms

    return ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )


@contextmanager
def _pixel_limit(max_image_pixels: int) -> Iterator[None]:
    """Set Pillow's bomb limit to the caller's cap (and its warning to an error) while decoding, so
    the cap decides at any value rather than Pillow's own ~89 M pixels.

    `Image.MAX_IMAGE_PIXELS` is process-wide: the build decodes one image at a time per process.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _open_allowed(data: bytes) -> ImageFile.ImageFile:
    """`Image.open` restricted to `ALLOWED_FORMATS`; reads the header only."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError as e:
        known = _sniff_format(data)
        if known is not None:
            raise DisallowedImageFormat(known) from e
        raise ImageError("image_format", f"not a supported image ({', '.join(ALLOWED_FORMATS)}): {e}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", f"over the cap of {Image.MAX_IMAGE_PIXELS} pixels: {e}") from e
    except Exception as e:
        raise ImageError("corrupt_image", f"unreadable image header: {e}") from e


def _sniff_format(data: bytes) -> str | None:
    """The Pillow format whose signature `data` starts with, by the plugins' prefix tests only (no
    plugin parses anything): tells a refused format apart from garbage."""
    Image.init()
    prefix = data[:16]  # what `Image.open` hands the same tests
    for name, (_, accept) in Image.OPEN.items():
        if accept is not None and accept(prefix):
            return name
    return None


def _check_frames(image: Image.Image, first_frame: bool) -> None:
    """Refuse animations and multi-page files unless `first_frame` (frame 0 is the one already open)."""
    # An MPO is a camera JPEG whose extra frames are previews or a stereo pair: frame 0 is the photo.
    if image.format == "MPO":
        return
    num_frames = getattr(image, "n_frames", 1)
    if num_frames > 1 and not first_frame:
        raise ImageError("multi_frame", f"{image.format} image with {num_frames} frames (first_frame is off)")


def process_image(
    data: bytes,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_format: str = "jpeg",
    quality: int = 95,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    first_frame: bool = False,
) -> ProcessedImage:
    """Decode `data` safely, resize once to the Qwen grid (bicubic) and encode in `image_format`.

    A JPEG source that already has the grid size, no EXIF rotation and RGB pixels is stored as is
    when the output format is JPEG too (re-encoding would only lose quality and time). `first_frame`
    keeps frame 0 of an animated or multi-page image instead of rejecting it (`multi_frame`).
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}: use one of {sorted(IMAGE_FORMATS)}")
    pil_format, ext = IMAGE_FORMATS[image_format]
    image = open_image_safely(data, max_image_pixels, first_frame=first_frame)
    try:
        height, width = smart_resize(image.height, image.width, FACTOR, min_pixels, max_pixels)
    except ValueError as e:
        raise ImageError("image_aspect_ratio", str(e)) from e
    if (width, height) != image.size:
        # Shrinking a lot: reduce first with a box filter, then bicubic (fast and alias-free).
        reducing_gap = 3.0 if image.width * image.height > 4 * width * height else None
        image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=reducing_gap)
    elif pil_format == "JPEG" and _is_plain_jpeg(data):
        return ProcessedImage(data=data, ext=ext, width=width, height=height)
    buf = io.BytesIO()
    if pil_format == "PNG":
        image.save(buf, format="PNG", compress_level=1)
    elif pil_format == "WEBP":
        image.save(buf, format="WEBP", quality=quality, method=4)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return ProcessedImage(data=buf.getvalue(), ext=ext, width=width, height=height)


def _is_plain_jpeg(data: bytes) -> bool:
    """A baseline-decodable RGB JPEG without an EXIF orientation, safe to store byte for byte."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            return im.mode == "RGB" and im.getexif().get(EXIF_ORIENTATION, 1) == 1
    except Exception:
        return False

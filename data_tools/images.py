"""Safe image decoding, `smart_resize` to the Qwen3-VL grid, and encoding for shards.

Qwen3-VL: 16-px patches merged 2x2, so one language-model token per 32x32 pixels. Image sides are
rounded to multiples of 32 with the total pixel count kept in [min_pixels, max_pixels]
(transformers' qwen2_vl `smart_resize`, with factor 32); `image_grid_thw = [1, H/16, W/16]`.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

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


class ImageError(ValueError):
    """An image that cannot be used; `reason` is the reject reason (`corrupt_image`, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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


def open_image_safely(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `data` into an RGB image: format allowlist, pixel cap from the header, EXIF transpose.

    Raises `ImageError` with reason `image_format`, `image_too_large` or `corrupt_image`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError as e:
        raise ImageError("image_format", f"not a supported image ({', '.join(ALLOWED_FORMATS)}): {e}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", str(e)) from e
    except Exception as e:
        raise ImageError("corrupt_image", f"unreadable image header: {e}") from e
    width, height = image.size
    # Size comes from the header; nothing has been decoded yet.
    if width * height > max_image_pixels:
        raise ImageError("image_too_large", f"{width}x{height} is over the cap of {max_image_pixels} pixels")
    if width <= 0 or height <= 0:
        raise ImageError("corrupt_image", f"image size {width}x{height}")
    try:
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # transposing always copies: only when needed
            image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            # Composite transparency onto white instead of letting it turn black.
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                image = canvas
            else:
                image = image.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # truncated data, bad EXIF, decoder errors
        raise ImageError("corrupt_image", f"cannot decode image: {e}") from e
    return image


def process_image(
    data: bytes,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_format: str = "jpeg",
    quality: int = 95,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ProcessedImage:
    """Decode `data` safely, resize once to the Qwen grid (bicubic) and encode in `image_format`.

    A JPEG source that already has the grid size, no EXIF rotation and RGB pixels is stored as is
    when the output format is JPEG too (re-encoding would only lose quality and time).
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}: use one of {sorted(IMAGE_FORMATS)}")
    pil_format, ext = IMAGE_FORMATS[image_format]
    image = open_image_safely(data, max_image_pixels)
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

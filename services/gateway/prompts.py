"""Prompt images from the wire (PNG/JPEG bytes or raw RGB) to uint8 arrays, with the gateway's size limits.

Limits are checked before pixels are decoded, so a small file claiming huge dimensions is refused cheaply.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from services.gateway.errors import InvalidArgument


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"prompt image is empty ({width}x{height}): width and height must be at least 1")
    if width * height > limits.max_pixels:
        raise InvalidArgument(f"prompt image is {width}x{height} = {width * height} pixels, over this gateway's "
                              f"limit of {limits.max_pixels} pixels; downscale it before sending")


def _check_bytes(size: int, limits: ImageLimits) -> None:
    if size == 0:
        raise InvalidArgument("prompt image is empty (0 bytes): send a PNG/JPEG file or raw RGB pixels")
    if size > limits.max_bytes:
        raise InvalidArgument(f"prompt image is {size} bytes, over this gateway's limit of {limits.max_bytes} bytes")


def decode_raw(rgb: bytes, width: int, height: int, limits: ImageLimits) -> np.ndarray:
    """Packed RGB rows -> uint8 [height, width, 3]."""
    _check_size(width, height, limits)
    _check_bytes(len(rgb), limits)
    expected = width * height * 3
    if len(rgb) != expected:
        raise InvalidArgument(f"raw RGB prompt has {len(rgb)} bytes but width*height*3 = "
                              f"{width}*{height}*3 = {expected}: send packed uint8 RGB rows")
    return np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)


def decode_encoded(data: bytes, limits: ImageLimits) -> np.ndarray:
    """A PNG/JPEG (any still image Pillow reads) -> uint8 [height, width, 3]."""
    _check_bytes(len(data), limits)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.width, image.height, limits)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as error:
        raise InvalidArgument(f"prompt image has too many pixels ({error}); this gateway's limit is "
                              f"{limits.max_pixels} pixels") from error
    except UnidentifiedImageError as error:
        raise InvalidArgument("prompt image is not a readable image: send PNG or JPEG bytes, "
                              "or raw RGB with width and height") from error
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt after a valid header
        raise InvalidArgument(f"prompt image could not be decoded ({error}): send a complete PNG or JPEG") from error

"""Prompt images of any size to the uint8 frames a world model takes (numpy and Pillow only, no torch).

Its own module so a process that only prepares prompts (the gateway with the `triton` backend) never loads torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def prepare_prompt(images: np.ndarray | Image.Image | Sequence[np.ndarray | Image.Image], image_size: int) -> np.ndarray:
    """Any image(s) of any size (HxWx3 / HxW / RGBA arrays or PIL images) -> uint8 [T, size, size, 3].

    The whole picture is resized (not cropped) so nothing in a sketch or photo is cut away.
    """
    if isinstance(images, (np.ndarray, Image.Image)):
        images = [images] if isinstance(images, Image.Image) or np.asarray(images).ndim <= 3 else list(images)
    if len(images) == 0:
        raise ValueError("a prompt needs at least one image")
    frames = []
    for image in images:
        picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        if picture.width == 0 or picture.height == 0:
            raise ValueError("prompt image is empty (zero width or height)")
        picture = picture.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        frames.append(np.asarray(picture, dtype=np.uint8))
    return np.stack(frames)

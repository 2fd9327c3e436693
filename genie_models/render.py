"""Pictures of a world for people: an action grid animation (GIF, MP4) and a reconstruction comparison.

In the grid every row repeats one latent action from the same real prompt frames, so a viewer can see
that each action does something different and consistent.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from genie_models.world import rollout_actions
from genie_models.world_model import WorldModel

LABEL_WIDTH = 28


def _upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    return frame.repeat(scale, axis=0).repeat(scale, axis=1)


def action_grid_frames(world: WorldModel, prompts: np.ndarray, num_steps: int, seed: int = 0,
                       scale: int = 2) -> list[np.ndarray]:
    """prompts uint8 [P, H, W, 3] -> animation frames; row a shows action a repeated from each prompt."""
    num_prompts, num_actions = prompts.shape[0], world.num_actions
    tiled = np.repeat(prompts, num_actions, axis=0)  # world index = prompt * num_actions + action
    actions = torch.arange(num_actions).repeat(num_prompts)[:, None].expand(-1, num_steps)
    generated = rollout_actions(world, tiled, actions, seed)  # [P*A, num_steps, H, W, 3]
    size = prompts.shape[1] * scale
    canvas_frames = []
    for t in range(num_steps + 1):
        canvas = Image.new("RGB", (LABEL_WIDTH + num_prompts * size, num_actions * size), "black")
        draw = ImageDraw.Draw(canvas)
        for action in range(num_actions):
            draw.text((4, action * size + size // 2 - 5), str(action), fill="white")
            for prompt in range(num_prompts):
                frame = tiled[prompt * num_actions + action] if t == 0 else generated[prompt * num_actions + action, t - 1]
                canvas.paste(Image.fromarray(_upscale(frame, scale)), (LABEL_WIDTH + prompt * size, action * size))
        canvas_frames.append(np.asarray(canvas))
    return canvas_frames


def save_gif(frames: list[np.ndarray], path: Path, frame_ms: int = 150) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def save_mp4(frames: list[np.ndarray], path: Path, fps: int = 6) -> None:
    height, width = (dim - dim % 2 for dim in frames[0].shape[:2])  # H.264 wants even sizes
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame[:height, :width], format="rgb24")))
        container.mux(stream.encode())


@torch.no_grad()
def reconstruction_image(world: WorldModel, frames: np.ndarray, scale: int = 2) -> Image.Image:
    """frames uint8 [N, H, W, 3] -> a picture with the originals on top and their reconstructions below."""
    clips = torch.from_numpy(frames)[:, None]
    decoded = world.tokenizer.decode(world.tokenizer.encode(clips))[:, 0].numpy()
    top = np.concatenate([_upscale(frame, scale) for frame in frames], axis=1)
    bottom = np.concatenate([_upscale(frame, scale) for frame in decoded], axis=1)
    return Image.fromarray(np.concatenate([top, bottom], axis=0))


def frame_strip(frames: np.ndarray, columns: int, scale: int = 2) -> Image.Image:
    """frames uint8 [N, H, W, 3] -> one picture, `columns` frames per row, in order."""
    rows = -(-len(frames) // columns)
    height, width = frames.shape[1] * scale, frames.shape[2] * scale
    canvas = Image.new("RGB", (columns * width, rows * height), "black")
    for index, frame in enumerate(frames):
        canvas.paste(Image.fromarray(_upscale(frame, scale)), ((index % columns) * width, (index // columns) * height))
    return canvas


def drawn_prompts(size: int) -> dict[str, np.ndarray]:
    """Pictures from outside any training set, made here (nothing is downloaded): a line drawing on
    paper, a photo-like landscape with soft gradients and noise, and a flat-colour cartoon."""
    rng = np.random.default_rng(0)
    drawing = Image.new("RGB", (size, size), (245, 242, 232))
    pen = ImageDraw.Draw(drawing)
    unit = size / 64
    pen.rectangle((14 * unit, 30 * unit, 42 * unit, 54 * unit), outline=(20, 20, 20), width=max(1, int(unit)))
    pen.polygon(((10 * unit, 30 * unit), (28 * unit, 14 * unit), (46 * unit, 30 * unit)), outline=(20, 20, 20))
    pen.ellipse((48 * unit, 6 * unit, 60 * unit, 18 * unit), outline=(200, 120, 0), width=max(1, int(unit)))
    pen.line((0, 56 * unit, size, 56 * unit), fill=(40, 120, 40), width=max(1, int(unit)))
    y, x = np.mgrid[0:size, 0:size] / size
    sky = np.stack([0.45 + 0.3 * y, 0.6 + 0.25 * y, 0.95 - 0.1 * y], axis=-1)
    ground = np.stack([0.25 + 0.1 * x, 0.45 + 0.1 * np.sin(8 * x), 0.15 + 0.0 * x], axis=-1)
    hills = y > 0.6 + 0.08 * np.sin(6 * x)
    photo = np.where(hills[..., None], ground, sky) + rng.normal(0, 0.03, (size, size, 3))
    cartoon = Image.new("RGB", (size, size), (90, 170, 230))
    brush = ImageDraw.Draw(cartoon)
    brush.rectangle((0, 44 * unit, size, size), fill=(120, 80, 40))
    brush.rectangle((8 * unit, 30 * unit, 24 * unit, 44 * unit), fill=(230, 200, 40))
    brush.ellipse((36 * unit, 22 * unit, 52 * unit, 38 * unit), fill=(220, 40, 60))
    return {"drawing": np.asarray(drawing), "photo": (photo.clip(0, 1) * 255).astype(np.uint8),
            "cartoon": np.asarray(cartoon)}

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

"""A folder of ordinary mp4 videos to try the video-folder path with, made here from CoinRun levels
that `generate_coinrun` never plays (nothing is downloaded): `python -m genie_models.data.sample_videos`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from genie_models.data.coinrun import play_level

FIRST_LEVEL = 1_000_000  # far above the levels generate_coinrun uses (0 .. episodes)


def write_video(frames: np.ndarray, path: Path, fps: int = 15, codec: str = "libx264", crf: int = 18) -> Path:
    """uint8 frames [T, H, W, 3] -> a video file (H.264 or VP9, 4:2:0 chroma as ordinary videos have)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options={"crf": str(crf)})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_coinrun_videos(out_dir: Path, num_videos: int, steps_per_video: int, seed: int = 0,
                         progress: bool = True) -> list[Path]:
    """Play num_videos fresh CoinRun levels with random actions and save each as out_dir/level-N.mp4."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for level in tqdm(range(FIRST_LEVEL, FIRST_LEVEL + num_videos), desc="videos", disable=not progress):
        episode = play_level(level, steps_per_video, seed)
        if len(episode.frames) >= 2:
            paths.append(write_video(episode.frames, out_dir / f"level-{level}.mp4"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the mp4 files into")
    parser.add_argument("--videos", type=int, default=400)
    parser.add_argument("--steps", type=int, default=120, help="actions per video (fewer if the level ends)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_coinrun_videos(args.out, args.videos, args.steps, args.seed)
    print(f"{len(paths)} videos in {args.out}")


if __name__ == "__main__":
    main()

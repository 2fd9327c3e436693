"""The `genie` command: data generation, training each stage, evaluation, rendering, play, and the demo.

Other packages add subcommands through the `genie.cli` entry point group (services add `serve`, `client`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
from PIL import Image

from genie_models.allocator import keep_freed_memory

PRESETS = ("tiny", "coinrun")


def _add_data(subparsers) -> None:
    data = subparsers.add_parser("data", help="make training data").add_subparsers(dest="source", required=True)
    coinrun = data.add_parser("coinrun", help="generate CoinRun episodes with procgen (random policy, hard mode)")
    coinrun.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    coinrun.add_argument("--episodes", type=int, default=400, help="one level per episode")
    coinrun.add_argument("--steps", type=int, default=120, help="actions per episode (fewer if the level ends)")
    coinrun.add_argument("--heldout-fraction", type=float, default=0.1)
    coinrun.add_argument("--seed", type=int, default=0)
    coinrun.set_defaults(handler=_run_data_coinrun)
    videos = data.add_parser("videos", help="ingest a folder of ordinary video files (mp4, webm, mkv, ...)")
    videos.add_argument("src", type=Path, help="folder searched recursively for videos")
    videos.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    videos.add_argument("--size", type=int, default=64, help="square frame size after center crop + resize")
    videos.add_argument("--fps", type=float, default=None, help="resample videos to this frame rate")
    videos.set_defaults(handler=_run_data_videos)


def _run_data_coinrun(args) -> None:
    from genie_models.data import generate_coinrun
    dataset = generate_coinrun(args.out, args.episodes, args.steps, args.heldout_fraction, args.seed)
    print(f"{len(dataset.episodes)} episodes, {dataset.num_frames} frames in {args.out}")


def _run_data_videos(args) -> None:
    from genie_models.data import ingest_video_folder
    dataset = ingest_video_folder(args.src, args.out, frame_size=args.size, fps=args.fps)
    print(f"{len(dataset.episodes)} episodes, {dataset.num_frames} frames in {args.out}")


def _add_train(subparsers) -> None:
    train = subparsers.add_parser("train", help="train one stage").add_subparsers(dest="stage", required=True)
    for stage, text in (("tokenizer", "stage 1: the video tokenizer"),
                        ("dynamics", "stage 2: latent actions + dynamics (needs a trained tokenizer)")):
        parser = train.add_parser(stage, help=text, description=f"{text}. Resumes from RUN's latest checkpoint; "
                                  "launch with torchrun for DDP on several GPUs (spell --run as --run-dir there).")
        parser.add_argument("--data", type=Path, required=True, help="dataset directory (genie data ...)")
        # --run-dir: the spelling for torchrun, whose argument parser takes --run for its own --run-path.
        parser.add_argument("--run", "--run-dir", type=Path, required=True, help="run directory for checkpoints")
        parser.add_argument("--preset", choices=PRESETS, default="tiny")
        parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
        parser.add_argument("--batch-size", type=int, default=None,
                            help="override the preset's clips per step (global: split over torchrun's processes)")
        parser.add_argument("--clip-length", type=int, default=None, help="override the preset's frames per clip")
        parser.add_argument("--checkpoint-every", type=int, default=None, help="override the steps between checkpoints")
        parser.add_argument("--seed", type=int, default=None, help="seed of initialisation and clip sampling")
        parser.add_argument("--device", default=None,
                            help="cpu, cuda (under torchrun: each process's own GPU), cuda:1; default: cuda if any")
        parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                            help="under torchrun, shard the transformer blocks across processes (FSDP) instead of "
                                 "replicating them (DDP); default: the preset's (on for coinrun)")
        if stage == "dynamics":
            parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer run or checkpoint dir")
            parser.add_argument("--world-out", type=Path, default=None, help="also export the world here")
            parser.add_argument("--lam-steps", type=int, default=None,
                                help="override the steps of the LAM's own phase (presets that have one, e.g. tiny; "
                                     "0: co-train the LAM with dynamics)")
        parser.set_defaults(handler=_run_train_tokenizer if stage == "tokenizer" else _run_train_dynamics)


def _training_config(preset, args):
    """The preset's TrainConfig with what the command line sets (--steps, --batch-size, --fsdp, ...)."""
    from dataclasses import replace
    names = ("steps", "batch_size", "clip_length", "checkpoint_every", "seed", "fsdp")
    overrides = {name: getattr(args, name) for name in names}
    return replace(preset, **{name: value for name, value in overrides.items() if value is not None})


def _run_train_tokenizer(args) -> None:
    from genie_models.data import EpisodeDataset
    from genie_models.tokenizer import TOKENIZER_PRESETS
    from genie_models.training.tokenizer import TOKENIZER_TRAINING, train_tokenizer
    run = train_tokenizer(EpisodeDataset.open(args.data), TOKENIZER_PRESETS[args.preset],
                          _training_config(TOKENIZER_TRAINING[args.preset], args), args.run, args.device)
    print(run.metrics)


def _run_train_dynamics(args) -> None:
    from dataclasses import replace

    from genie_models.data import EpisodeDataset
    from genie_models.dynamics import DYNAMICS_PRESETS
    from genie_models.lam import LAM_PRESETS
    from genie_models.training.common import is_main_process
    from genie_models.training.dynamics import DYNAMICS_TRAINING, LAM_FIRST, train_dynamics
    from genie_models.training.tokenizer import load_tokenizer
    lam_first = None if args.lam_steps == 0 else LAM_FIRST[args.preset]
    if lam_first is not None:  # the sizes apply to the LAM's phase too; its steps have their own flag
        lam_first = replace(_training_config(lam_first, args), steps=args.lam_steps or lam_first.steps)
    run = train_dynamics(EpisodeDataset.open(args.data), load_tokenizer(args.tokenizer), LAM_PRESETS[args.preset],
                         DYNAMICS_PRESETS[args.preset], _training_config(DYNAMICS_TRAINING[args.preset], args),
                         args.run, args.device, lam_first=lam_first)
    if args.world_out and is_main_process():  # one writer under torchrun
        run.world.save(args.world_out, step=args.steps or DYNAMICS_TRAINING[args.preset].steps, metrics=run.metrics)
    print(run.metrics)


def _add_world_commands(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a world on held-out clips -> JSON + table")
    evaluate.add_argument("--world", type=Path, required=True, help="world checkpoint (or its run directory)")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--out", type=Path, default=Path("metrics.json"))
    evaluate.add_argument("--clips", type=int, default=64, help="held-out clips to evaluate")
    evaluate.add_argument("--horizon", type=int, default=None,
                          help="frames generated after the prompt frame (default: the evaluation's own)")
    evaluate.add_argument("--action-guidance", type=float, default=None,
                          help="sample with this action guidance instead of the world's own (see DynamicsConfig)")
    evaluate.set_defaults(handler=_run_eval)
    render = subparsers.add_parser("render", help="render an action grid (GIF/MP4) from prompt images")
    render.add_argument("--world", type=Path, required=True)
    render.add_argument("--image", type=Path, nargs="+", required=True, help="prompt image(s), any size")
    render.add_argument("--steps", type=int, default=12)
    render.add_argument("--out", type=Path, default=Path("action_grid.gif"), help=".gif or .mp4")
    render.set_defaults(handler=_run_render)
    play = subparsers.add_parser("play", help="play a world in the terminal: type action numbers, frames are "
                                 "shown and saved; q, quit, exit, Ctrl-D or Ctrl-C to stop")
    play.add_argument("--world", type=Path, required=True)
    play.add_argument("--image", type=Path, required=True, help="prompt image, any size")
    play.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    play.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default: the world's)")
    play.add_argument("--maskgit-steps", type=int, help="MaskGIT passes per frame (default: the world's)")
    play.add_argument("--action-guidance", type=float,
                      help="how strongly actions steer the frames, 1 = as trained (default: the world's)")
    play.add_argument("--out", type=Path, default=Path("play"), help="folder for frame PNGs and play.gif")
    play.add_argument("--no-show", dest="show", action="store_false", help="do not draw frames in the terminal")
    play.set_defaults(handler=_run_play)
    demo = subparsers.add_parser("demo", help="the main job: data, training, evaluation and pictures")
    demo.add_argument("--preset", choices=PRESETS, default="tiny")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--device", default=None)
    demo.add_argument("--videos", type=Path, default=None,
                      help="train on this folder of ordinary videos instead of generated CoinRun levels")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args) -> None:
    from genie_models.demo import run_demo
    run_demo(args.preset, args.out, args.device, args.videos)


def _run_eval(args) -> None:
    from genie_models.data import EpisodeDataset
    from genie_models.evaluation import EvalConfig, evaluate_world, write_metrics
    from genie_models.world_model import WorldModel
    sizes = {"num_clips": args.clips} | ({} if args.horizon is None else {"horizon": args.horizon})
    world = WorldModel.load(args.world)
    if args.action_guidance is not None:
        world.dynamics.config = replace(world.dynamics.config, action_guidance=args.action_guidance)
    metrics = evaluate_world(world, EpisodeDataset.open(args.data), EvalConfig(**sizes))
    print(write_metrics(metrics, args.out))


def _load_prompt_images(paths: list[Path], size: int) -> np.ndarray:
    from genie_models.world import prepare_prompt
    return np.concatenate([prepare_prompt(Image.open(path), size) for path in paths])


def _run_render(args) -> None:
    from genie_models.render import action_grid_frames, save_gif, save_mp4
    from genie_models.world_model import WorldModel
    world = WorldModel.load(args.world)
    frames = action_grid_frames(world, _load_prompt_images(args.image, world.image_size), args.steps)
    (save_mp4 if args.out.suffix == ".mp4" else save_gif)(frames, args.out)
    print(f"wrote {args.out}")


def _run_play(args) -> None:
    from genie_models.terminal import TerminalGame
    from genie_models.world import World
    from genie_models.world_model import WorldModel
    model = WorldModel.load(args.world)
    world = World(model, seed=args.seed, num_maskgit_steps=args.maskgit_steps, temperature=args.temperature,
                  action_guidance=args.action_guidance)
    TerminalGame(world, model.num_actions, args.out, show_frames=args.show).play(world.reset(Image.open(args.image)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genie", description="Genie: playable worlds learned from unlabeled video.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_data(subparsers)
    _add_train(subparsers)
    _add_world_commands(subparsers)
    for entry_point in entry_points(group="genie.cli"):
        entry_point.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: say what is wrong, no traceback
        sys.exit(f"genie {args.command}: error: {error}")


if __name__ == "__main__":  # `torchrun ... -m genie_models.cli train ...` for DDP
    main()

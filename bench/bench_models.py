"""Benchmark the models: training frames/s per stage, and world stepping frames/s with and without the
KV cache and for batches of 1, 8 and 32 worlds. CPU: `--preset tiny`; GPU: `--preset coinrun --device cuda`.

    python bench/bench_models.py --preset tiny [--device cpu] [--out bench/results/models-tiny-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from genie_models.allocator import keep_freed_memory
from genie_models.dynamics import maskgit_sample
from genie_models.training.dynamics import DYNAMICS_TRAINING, LAM_FIRST, CoTrained
from genie_models.training.tokenizer import TOKENIZER_TRAINING
from genie_models.world import WorldPool
from genie_models.world_model import WorldModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call after warmup."""
    return _timed_in_turn([fn], device, warmup, repeats)[0]


def _timed_in_turn(fns, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Median seconds per call of each function, called in turn (first, second, ..., first, ...): on shared cores
    whose speed drifts over seconds they all see the same machine, so their ratios are steadier than those of
    blocks timed one after another."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            fn_times.append(time.perf_counter() - start)
    return [float(np.median(fn_times)) for fn_times in times]


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def bench_training(world: WorldModel, preset: str, device: torch.device, repeats: int) -> dict[str, float]:
    """Training frames/s of each phase of the preset's recipe (tokenizing on the fly, as training does)."""
    def clips(config):
        return torch.randint(0, 256, (config.batch_size, config.clip_length, world.image_size, world.image_size, 3),
                             dtype=torch.uint8, device=device)

    results = {}
    frames = clips(TOKENIZER_TRAINING[preset])
    results["train_tokenizer_frames_per_s"] = _train_frames_per_s(
        lambda: world.tokenizer(frames).loss, world.tokenizer.train(), frames, device, repeats)
    lam_first = LAM_FIRST[preset]
    if lam_first is not None:  # the preset trains the LAM alone first, then dynamics against it frozen
        lam_clips = clips(lam_first)
        results["train_lam_frames_per_s"] = _train_frames_per_s(
            lambda: world.lam(lam_clips).loss, world.lam.train(), lam_clips, device, repeats)
    dynamics_clips = clips(DYNAMICS_TRAINING[preset])
    pair = CoTrained(world.lam, world.dynamics, train_lam=lam_first is None).train()
    tokenizer = world.tokenizer.eval()
    name = "train_dynamics_frames_per_s" if lam_first is not None else "train_lam_dynamics_frames_per_s"
    results[name] = _train_frames_per_s(
        lambda: pair(dynamics_clips, tokenizer.encode(dynamics_clips).flatten(2))["loss"], pair, dynamics_clips,
        device, repeats)
    return results


def _train_frames_per_s(loss_fn, module: torch.nn.Module, frames: torch.Tensor, device: torch.device,
                        repeats: int) -> float:
    """Median training frames/s of optimizer steps on loss_fn() over module's parameters."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)

    def step():
        with _autocast(device):
            loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return frames.shape[0] * frames.shape[1] / _timed(step, device, 2, repeats)


def filled_pool(world: WorldModel, count: int, device: torch.device, dtype: torch.dtype) -> tuple[WorldPool, list[int]]:
    pool = WorldPool(world, max_worlds=count, device=device, dtype=dtype)
    prompt = np.random.default_rng(0).integers(0, 256, (world.image_size, world.image_size, 3), dtype=np.uint8)
    ids = [pool.create(prompt, seed=index)[0] for index in range(count)]
    context = world.dynamics.config.context_frames
    for _ in range(context):  # fill the window so every step attends over a full context
        pool.step({world_id: 0 for world_id in ids})
    return pool, ids


@torch.no_grad()
def recompute_step(world: WorldModel, tokens: torch.Tensor, actions: torch.Tensor, action: int) -> torch.Tensor:
    """One world step WITHOUT a KV cache, the baseline to beat: the same MaskGIT sampler and decoder, but
    every pass reruns the transformer over the whole context window (and scores its newest frame, as the cached
    step does: scoring all of them cost the baseline 6-19% more, which flattered the cache). tokens [1, T, S],
    actions [1, T]."""
    config = world.dynamics.config
    history_actions = torch.cat([actions, torch.tensor([[action]], device=tokens.device)], dim=1)
    uniforms = torch.rand(1, config.num_maskgit_steps, tokens.shape[2], device=tokens.device)
    temperature = torch.full((1,), config.temperature, device=tokens.device)
    frame = maskgit_sample(
        lambda new: world.dynamics.sampling_logits(torch.cat([tokens, new[:, None]], dim=1), history_actions,
                                                   newest_only=True)[:, 0],
        config.mask_id, config.num_maskgit_steps, temperature, uniforms)
    window = torch.cat([tokens, frame[:, None]], dim=1)[:, -config.context_frames:]
    grid = world.tokenizer.config.grid_size
    # A temporal decoder must rerun the window too; a per-frame one decodes just the new frame either way.
    decoded = window if world.tokenizer.decoder.config.is_temporal else window[:, -1:]
    world.tokenizer.decode(decoded.reshape(1, decoded.shape[1], grid, grid))
    return window


def bench_stepping(world: WorldModel, device: torch.device, dtype: torch.dtype, repeats: int,
                   batch_sizes: list[int]) -> dict[str, float]:
    """Stepping frames/s of batches of worlds, and one world's step with vs without the KV cache (timed in turn)."""
    world.eval()
    pool, ids = filled_pool(world, 1, device, dtype)
    config = world.dynamics.config
    tokens = torch.randint(0, config.num_codes, (1, config.context_frames - 1, config.tokens_per_frame), device=device)
    actions = torch.zeros(1, config.context_frames - 1, dtype=torch.long, device=device)
    cached, recomputed = _timed_in_turn([lambda: pool.step({ids[0]: 1}),
                                         lambda: recompute_step(world, tokens, actions, 1)], device, 1, repeats)
    results = {"step_1_worlds_frames_per_s": 1 / cached, "step_1_world_no_cache_frames_per_s": 1 / recomputed,
               "kv_cache_speedup": recomputed / cached}
    for count in batch_sizes:
        if count == 1:
            continue
        pool, ids = filled_pool(world, count, device, dtype)
        seconds = _timed(lambda: pool.step({world_id: 1 for world_id in ids}), device, 1, repeats)
        results[f"step_{count}_worlds_frames_per_s"] = count / seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "coinrun"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,8,32",
                        help="batch sizes of worlds to step (one world is always stepped, in turn with the no-cache "
                             "baseline)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--context-frames", type=int, default=None,
                        help="override the models' temporal window (the KV-cache speedup grows with it)")
    parser.add_argument("--maskgit-steps", type=int, default=None,
                        help="override the preset's MaskGIT passes per frame (the KV-cache speedup grows with them)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as it is (the genie entry points tune it: genie_models/allocator.py)")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args()
    malloc_tuned = not args.default_malloc and keep_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(0)
    world = WorldModel.from_preset(args.preset, args.context_frames).to(device)
    if args.maskgit_steps is not None:
        world.dynamics.config = replace(world.dynamics.config, num_maskgit_steps=args.maskgit_steps)
    results = {"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "context_frames": world.dynamics.config.context_frames,
               "maskgit_steps": world.dynamics.config.num_maskgit_steps, "malloc_tuned": malloc_tuned}
    if not args.skip_training:
        results |= bench_training(world, args.preset, device, args.repeats)
    cache_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with _autocast(device):
        results |= bench_stepping(world, device, cache_dtype, args.repeats, [int(b) for b in args.batches.split(",")])
    for name, value in results.items():
        print(f"{name:<40} {value:>12.2f}" if isinstance(value, float) else f"{name:<40} {value!s:>12}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Where one world step's time goes: torch.profiler over steps of a filled WorldPool, the operators with
the most host and device time, and how many kernels one step launches (launch-bound on a GPU when that
count times ~5-10 µs approaches the step time).

    python bench/profile_step.py --preset coinrun --device cuda --worlds 1 [--out trace-dir]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_models import filled_pool  # a sibling script: running bench/X.py puts bench/ on sys.path
from genie_models.allocator import keep_freed_memory
from genie_models.world_model import WorldModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "coinrun"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worlds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after a warm-up step)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="write a Chrome trace here")
    args = parser.parse_args()
    keep_freed_memory()  # as every genie entry point
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    world = WorldModel.from_preset(args.preset).to(device).eval()
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    with autocast:
        pool, ids = filled_pool(world, args.worlds, device, dtype)
        pool.step({world_id: 1 for world_id in ids})  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                pool.step({world_id: 1 for world_id in ids})
        elapsed = (time.perf_counter() - started) / args.steps
    events = prof.key_averages()
    print(f"{args.preset} on {torch.cuda.get_device_name() if cuda else 'cpu'}, {args.worlds} world(s): "
          f"{elapsed * 1e3:.1f} ms per step under the profiler")
    if cuda:
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        device_ms = sum(e.self_device_time_total for e in events
                        if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / args.steps
        print(f"kernels per step: {kernels / args.steps:.0f}; device busy {device_ms:.1f} ms per step")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.out / f"step-{args.preset}-{args.worlds}.json"))


if __name__ == "__main__":
    main()

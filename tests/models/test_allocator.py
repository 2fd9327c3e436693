"""The malloc settings every genie entry point applies: a world step stops page-faulting its activations in anew."""

import json
import os
import subprocess
import sys

from genie_models.allocator import MALLOC_ENVIRONMENT

# Runs in a fresh process (malloc settings are per process and cannot be undone): applies the settings, steps a
# random-init tiny world and reports the minor page faults per step.
STEP_FAULTS = """
import json, resource
import numpy as np, torch
from genie_models.allocator import keep_freed_memory
applied = keep_freed_memory()
from genie_models.world import WorldPool
from genie_models.world_model import WorldModel
torch.manual_seed(0)
world = WorldModel.from_preset("tiny").eval()
pool = WorldPool(world, max_worlds=1)
world_id, _ = pool.create(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
for _ in range(world.dynamics.config.context_frames + 2):  # a full window, as a long-lived world's
    pool.step({world_id: 1})
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    pool.step({world_id: 1})
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults_per_step": faults / 10}))
"""


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without any malloc tuning of its own, plus extra."""
    return {name: value for name, value in os.environ.items() if name not in MALLOC_ENVIRONMENT} | extra


def test_a_world_step_reuses_freed_memory_instead_of_faulting_it_in():
    # With glibc's defaults a tiny world's step faulted in 1,600-3,060 pages (6-12 MiB) on the 2-core machine;
    # with the settings a step reuses what the last one freed (0-6 faults).
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS], env=_environment(), check=True, capture_output=True,
                            text=True, timeout=300)
    tuned = json.loads(result.stdout.strip().splitlines()[-1])
    assert tuned["applied"]
    assert tuned["faults_per_step"] < 256, tuned


def test_malloc_settings_from_the_environment_are_left_alone():
    check = "from genie_models.allocator import keep_freed_memory; print(keep_freed_memory())"
    applied = [subprocess.run([sys.executable, "-c", check], env=env, check=True, capture_output=True, text=True,
                              timeout=60).stdout.strip()
               for env in (_environment(), _environment(MALLOC_TRIM_THRESHOLD_="1048576"))]
    assert applied == ["True", "False"]

"""Suite-wide settings: one torch thread per process, since the tests run model code beside real servers
on a 2-core machine, where two OpenMP threads fighting for a busy core make small ops 10x slower."""

import torch

torch.set_num_threads(1)

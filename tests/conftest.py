"""Test-wide settings."""

import torch

# One thread: the suite's in-process work is small, and on a 2-core machine shared with Ray workers and
# subprocesses, two OpenMP threads per process oversubscribe the cores and run many times slower.
torch.set_num_threads(1)

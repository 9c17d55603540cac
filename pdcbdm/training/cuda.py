"""Why torch sees no GPU, in words a user can act on: ``cuda_diagnosis`` names torch's CUDA build and the NVIDIA
driver it found (or that it found none), the usual cause being a driver older than the CUDA the pinned torch was
built for."""

from __future__ import annotations

import shutil
import subprocess

import torch

__all__ = ["GPU_NETWORKS", "cuda_diagnosis"]

# U-Nets sized for GPUs (their CPU steps: docs/results.md, "Step costs" and "Your own data: Fashion-MNIST-LT")
GPU_NETWORKS = ("cifar", "own64", "own128")


def cuda_diagnosis() -> str:
    """torch's CUDA build, the devices it sees, and the driver ``nvidia-smi`` reports (or that there is none)."""
    built = f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda else \
        f"torch {torch.__version__} built without CUDA (a CPU-only wheel)"
    seen = f"{torch.cuda.device_count()} CUDA device(s) visible"
    return f"{built}; {seen}; {_driver()}"


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver found (nvidia-smi is not installed)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed ({exc})"
    if out.returncode != 0:
        return f"nvidia-smi failed ({(out.stderr or out.stdout).strip()[:200]})"
    gpus = "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip())
    return (f"nvidia-smi reports {gpus or 'no GPU'}: a driver older than the one CUDA {torch.version.cuda} needs "
            f"hides the GPUs from torch (docs/cluster-and-gpu.md, \"NVIDIA driver and CUDA\": install a torch "
            f"built for your driver's CUDA)")

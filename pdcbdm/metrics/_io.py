"""Cache folder, atomic writes and content hashes shared by the metric caches.

Every cached file (digits network, reference statistics, mapped Inception weights) is written to a temporary file in
its destination folder and moved into place with os.replace, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from pdcbdm.io import atomic_write

__all__ = ["CACHE_ENV", "resolve_cache_dir", "atomic_write", "atomic_torch_save", "sha256_file", "sha256_state",
           "sha256_text", "dataset_identity"]

CACHE_ENV = "PDCBDM_CACHE"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder metric caches live in, created if missing.

    Args:
        cache_dir: explicit folder; None means `$PDCBDM_CACHE`, or `~/.cache/pdcbdm` when that is unset.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pdcbdm"
    path = Path(cache_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cache_dir {str(path)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_torch_save(obj: object, path: str | os.PathLike[str]) -> Path:
    """torch.save `obj` (tensors, dicts, numbers, strings only: it is read back with weights_only=True) atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_state(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's names, dtypes, shapes and values, independent of how it was serialised."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Through numpy bytes: bfloat16 has no numpy dtype, so view it as raw int16 first.
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        digest.update(np.ascontiguousarray(raw.numpy()).tobytes())
    return digest.hexdigest()


def sha256_text(*parts: str) -> str:
    """Hex sha256 of text parts joined by a separator that cannot occur inside identity strings."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def dataset_identity(images: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None = None) -> str:
    """Content hash "data/sha256:<hex>" of an image set: shape, pixels, labels and class names.

    Args:
        images: uint8 [N, C, H, W] tensor.
        labels: int [N] tensor.
        class_names: optional class names (part of the identity when given).
    """
    digest = hashlib.sha256()
    digest.update(f"{tuple(images.shape)}|{images.dtype}|{class_names}|".encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return f"data/sha256:{digest.hexdigest()}"

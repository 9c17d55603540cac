"""In-memory labelled image data set shared by every data source (CIFAR, digits, Parquet shards).

Images are stored as uint8 [N, C, H, W] and served as float32 in [-1, 1], the pixel scaling the paper uses
(docs/method.md, "Training settings": "pixels scaled to [-1, 1]").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["ImageDataset", "to_unit_range"]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels 0..255 to float32 in [-1, 1] (0 -> -1, 255 -> 1).

    Args:
        images: uint8 tensor of any shape.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got dtype {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def _as_index(indices: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    """Turn `indices` into an int64 index tensor and check every entry lies in [-n, n)."""
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"boolean mask has shape {tuple(idx.shape)}, expected ({n},)")
        return idx.nonzero().flatten()
    if idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.to(torch.int64).flatten()
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise ValueError(f"indices out of range for a data set of {n} images: "
                         f"min {int(idx.min())}, max {int(idx.max())}")
    return idx


class ImageDataset(Dataset):
    """A labelled image data set held in memory.

    Args:
        images: uint8 tensor [N, C, H, W], pixels 0..255.
        labels: integer tensor [N] with values in [0, len(class_names)); stored as int64.
        class_names: one name per class; its length is the number of classes K (classes may have no images).
        hflip: if True, `__getitem__` and `batch` flip each image left-right with probability 1/2 (CIFAR only:
            a flipped digit is another digit).

    Attributes:
        images: the uint8 tensor [N, C, H, W].
        labels: the int64 tensor [N].
        class_names: list of K names.
        hflip: whether random horizontal flips are applied (may be changed after construction).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 hflip: bool = False) -> None:
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got dtype {images.dtype} "
                             f"and shape {tuple(images.shape)}")
        if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-d integer tensor, got dtype {labels.dtype} "
                             f"and shape {tuple(labels.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but images has {images.shape[0]}")
        names = [str(n) for n in class_names]
        if not names:
            raise ValueError("class_names is empty: a data set needs at least one class")
        labels = labels.to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
            raise ValueError(f"labels must lie in [0, {len(names)}) (len(class_names)), "
                             f"got min {int(labels.min())}, max {int(labels.max())}")
        self.images = images.contiguous()
        self.labels = labels.contiguous()
        self.class_names = names
        self.hflip = bool(hflip)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return image `i` as float32 [C, H, W] in [-1, 1] (randomly flipped if `hflip`) and its label."""
        x = to_unit_range(self.images[i])
        # The global RNG is used so DataLoader workers, each seeded by PyTorch, flip independently.
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, int(self.labels[i])

    @property
    def num_classes(self) -> int:
        """Number of classes K (= len(class_names))."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def counts(self) -> list[int]:
        """Number of images n_k of each class k = 0..K-1 (zeros included)."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """A new data set holding the images at `indices` (int positions or a boolean mask), same classes and flip."""
        idx = _as_index(indices, len(self))
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names, hflip=self.hflip)

    def batch(self, indices: torch.Tensor | Sequence[int], generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather a batch without a DataLoader (used for the PD loss's head and tail batches, Eq. 10).

        Args:
            indices: data set positions of the B images to gather.
            generator: random source of the flips when `hflip` is on (None: the global generator). It must
                live on the CPU.
            device: where the returned tensors live; the uint8 images are moved before conversion so the
                transfer stays small. None keeps them on the CPU.

        Returns:
            x: float32 [B, C, H, W] in [-1, 1]; y: int64 [B].
        """
        idx = _as_index(indices, len(self))
        x, y = self.images[idx], self.labels[idx]
        if self.hflip and idx.numel():
            flip = torch.rand(idx.numel(), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if device is not None:
            x, y = x.to(device), y.to(device)
        return to_unit_range(x), y

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes}, hflip={self.hflip})")

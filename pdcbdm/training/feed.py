"""The training batches, gathered where the training runs.

The data set's uint8 images go to the training device once when they fit (a CIFAR-LT set is 38 MB), and every
random draw of the batch (the epoch's order, the flips, the PD pairs' indices) comes from a generator on that
device: a step then reads nothing back to the host and uploads nothing. Every worker draws the global batch with
the same seed and keeps its rows (``Shard``), so a run is the same with any number of workers; on the CPU the
draws are those of a CPU generator, in the order the trainer has always made them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pdcbdm.data import ClassGroupSampler, ImageDataset, to_unit_range
from pdcbdm.data.split import HeadTailSplit

# at most this share of the free GPU memory holds the data set; a larger one stays on the host, at the cost of
# one host round trip per gather (its indices are read back to index the host copy)
DEVICE_DATA_SHARE = 0.25


def data_device(dataset: ImageDataset, device: torch.device) -> torch.device:
    """Where the images are kept: ``device`` when it is the CPU or they fit in ``DEVICE_DATA_SHARE`` of its free
    memory, else the CPU."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    size = dataset.images.numel() * dataset.images.element_size() + dataset.labels.numel() * 8
    return device if size <= DEVICE_DATA_SHARE * free else torch.device("cpu")


class BatchFeed:
    """The global batch's draws and this rank's rows of them, from ``generator`` (it must live on ``device``)."""

    def __init__(self, dataset: ImageDataset, split: HeadTailSplit, device: torch.device,
                 generator: torch.Generator, rank: int = 0, world: int = 1) -> None:
        self.device, self.generator, self.rank, self.world = device, generator, rank, world
        home = data_device(dataset, device)
        self.images, self.labels, self.hflip = dataset.images.to(home), dataset.labels.to(home), dataset.hflip
        self.size = len(dataset)
        self.head = ClassGroupSampler(dataset.labels, split.head).to(device)
        self.tail = ClassGroupSampler(dataset.labels, split.tail).to(device)
        self.order: Tensor | None = None
        self.cursor = 0

    def next_indices(self, batch: int) -> Tensor:
        """The next global batch's indices (every rank alike); the data are reshuffled each epoch."""
        if self.order is None or self.cursor + batch > len(self.order):
            self.order = torch.randperm(self.size, generator=self.generator, device=self.device)
            self.cursor = 0
        idx = self.order[self.cursor:self.cursor + batch]
        self.cursor += batch
        return idx

    def group(self, head: bool, n: int) -> Tensor:
        """n indices drawn from the head (or tail) classes' images (Eq. 10's pairs)."""
        return (self.head if head else self.tail).sample(n, self.generator)

    def gather(self, indices: Tensor, n_local: int) -> tuple[Tensor, Tensor]:
        """This rank's rows of the global batch at ``indices`` as float images in [-1, 1] on the device: the flips
        are drawn for the global batch and sliced like every other draw."""
        x, y = self._take(indices)
        if self.hflip and indices.numel():
            flip = torch.rand(indices.numel(), generator=self.generator, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        rows = slice(self.rank * n_local, (self.rank + 1) * n_local)
        return to_unit_range(x[rows]), y[rows]

    def _take(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        if self.images.device == indices.device:
            return self.images[indices], self.labels[indices]
        host = indices.cpu()
        return self.images[host].to(self.device), self.labels[host].to(self.device)

    def state(self) -> dict[str, object]:
        order = self.order.cpu() if self.order is not None else torch.empty(0, dtype=torch.long)
        return {"data_order": order, "data_cursor": self.cursor}

    def load(self, order: Tensor, cursor: int) -> None:
        if len(order):
            self.order, self.cursor = order.to(self.device), int(cursor)

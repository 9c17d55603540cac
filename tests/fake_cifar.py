"""Fake CIFAR-10/100 files in torchvision's pickle layout, so the real CIFAR reader runs in tests: the library's
writer (``pdcbdm.data.fake_cifar``, which ``pipelines.gpu_check`` uses too) under the names the tests import.
Usable by hand too:

    python -m tests.fake_cifar --variant cifar10 --train-per-class 5000 --test-per-class 1000 /tmp/fakecifar
"""

from __future__ import annotations

import argparse

from pdcbdm.data.fake_cifar import write_fake_cifar10, write_fake_cifar100

__all__ = ["main", "write_fake_cifar10", "write_fake_cifar100"]


def main(argv: list[str] | None = None) -> None:
    """Command line: write a fake CIFAR folder."""
    parser = argparse.ArgumentParser(description="Write fake CIFAR files in torchvision's layout.")
    parser.add_argument("root", help="parent folder to write cifar-10-batches-py/ or cifar-100-python/ into")
    parser.add_argument("--variant", choices=("cifar10", "cifar100"), default="cifar10", help="which CIFAR")
    parser.add_argument("--train-per-class", type=int, default=20, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=5, help="test images per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of images and label order")
    args = parser.parse_args(argv)
    write = write_fake_cifar10 if args.variant == "cifar10" else write_fake_cifar100
    print(write(args.root, args.train_per_class, args.test_per_class, args.seed))


if __name__ == "__main__":
    main()

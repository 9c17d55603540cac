"""Reader of the CIFAR-10/100 "python version" files in torchvision's folder layout.

The files are read here rather than through torchvision's classes, which check md5 sums and so reject the small
fake files the tests write. torchvision is only used to download (`download=True`).

Layout under `root`:
    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python/{train, test, meta}
Each file is a pickled dict; b"data" is uint8 [N, 3072] (row-major C, H, W of 3 x 32 x 32 images), b"labels"
(CIFAR-10) or b"fine_labels" (CIFAR-100) the labels, and the meta file holds b"label_names" /
b"fine_label_names".

The files are unpickled by ``_CifarUnpickler``, which admits only the globals numpy arrays need: a ``data.root`` on
shared storage holds untrusted files, and a plain ``pickle.load`` runs whatever a file names.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["CifarSpec", "CIFAR_SPECS", "load_cifar", "cifar_dir"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant keeps its files and which keys it uses."""

    name: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int


CIFAR_SPECS = {
    "cifar10": CifarSpec("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                         tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
                         "labels", "label_names", 10),
    "cifar100": CifarSpec("cifar100", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",),
                          "meta", "fine_labels", "fine_label_names", 100),
}


def _how_to_get(spec: CifarSpec, root: Path) -> str:
    return (f"Fetch it with torchvision (download=True; on the command line of training, the search and the "
            f"ablation: --set data.download=true; prepare_data: --download), or extract "
            f"{spec.archive} from {CIFAR_URL} into {root} so that {root / spec.folder}/ holds "
            f"{', '.join(spec.train_files + spec.test_files + (spec.meta_file,))}.")


def cifar_dir(spec: CifarSpec, root: str | Path) -> Path:
    """The folder holding `spec`'s files: root/<folder>, or root itself if it already is that folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR root folder {root} does not exist. {_how_to_get(spec, root)}")
    if (root / spec.meta_file).is_file() and not (root / spec.folder).is_dir():
        return root
    return root / spec.folder


class UnsafePickleError(ValueError):
    """A CIFAR file whose pickle names a global beyond what numpy arrays need; the message names file and global."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles of bytes use it: latin-1 only, no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {type(text).__name__}, {encoding!r}: only latin1 text")
    return text.encode("latin1")


def _numpy_reconstruct() -> Any:
    """numpy's array reconstructor, from where this numpy keeps it (numpy 2 warns on ``numpy.core``)."""
    try:
        from numpy._core.multiarray import _reconstruct  # deferred: numpy-version fallback; numpy >= 2, 1.26's alias
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # deferred: numpy-version fallback; older numpy
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR files: dicts, lists, bytes, str, int and numpy arrays of plain dtypes.

    The rule (``find_class``): the only globals are numpy's array reconstructor (``numpy.core.multiarray`` in the
    Python 2 originals, ``numpy._core.multiarray`` in files numpy 2 writes), ``numpy.ndarray``, ``numpy.dtype``
    and, for bytes pickled by Python 3 with protocol 2, ``_codecs.encode`` restricted to latin-1. Any other global
    raises UnsafePickleError naming the file and the global, before anything is called.
    """

    _ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    _RECONSTRUCT = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")})

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]
        if (module, name) in self._RECONSTRUCT:
            return _numpy_reconstruct()
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickleError(f"{self.path} is not a plain CIFAR pickle: it references the global "
                                f"{module}.{name}, and CIFAR files hold only numpy arrays, dtypes, lists, dicts, "
                                f"bytes, str and int (refused without calling it)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self.path}: a persistent id; CIFAR files hold none")


def _unpickle(path: Path, spec: CifarSpec, root: Path) -> dict[str, Any]:
    """Load one pickled CIFAR dict with ``_CifarUnpickler``, keys decoded to str (the files were written by
    Python 2, keys are bytes)."""
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name} file {path} not found. {_how_to_get(spec, root)}")
    with path.open("rb") as f:
        try:
            raw = _CifarUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # a truncated or foreign file: say which one
            raise ValueError(f"{path} is not a readable CIFAR pickle: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} should hold a pickled dict, got {type(raw).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _read_batch(path: Path, spec: CifarSpec, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] of one batch file."""
    entry = _unpickle(path, spec, root)
    for key in ("data", spec.label_key):
        if key not in entry:
            raise ValueError(f"{path} lacks the key b{key!r} (keys: {sorted(entry)})")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[spec.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {spec.num_classes}), "
                         f"got min {labels.min()}, max {labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_names(folder: Path, spec: CifarSpec, root: Path) -> list[str]:
    path = folder / spec.meta_file
    entry = _unpickle(path, spec, root)
    if spec.names_key not in entry:
        raise ValueError(f"{path} lacks the key b{spec.names_key!r} (keys: {sorted(entry)})")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in entry[spec.names_key]]
    if len(names) != spec.num_classes:
        raise ValueError(f"{path}: {len(names)} class names, expected {spec.num_classes}")
    return names


def _is_complete(spec: CifarSpec, root: str | Path) -> bool:
    """Whether every file of `spec` is already present under `root` (then nothing is downloaded)."""
    folder = Path(root).expanduser() / spec.folder
    return all((folder / f).is_file() for f in spec.train_files + spec.test_files + (spec.meta_file,))


def download_cifar(name: str, root: str | Path) -> None:
    """Fetch and extract CIFAR `name` ("cifar10"/"cifar100") into `root` with torchvision (needs internet)."""
    import torchvision  # deferred: seconds to import (docs/results.md, "Import costs"); only downloading needs it

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(str(Path(root).expanduser()), train=train, download=True)


def load_cifar(name: str, root: str | Path, split: str = "train",
               download: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read CIFAR-10 or CIFAR-100 from `root`.

    Args:
        name: "cifar10" or "cifar100".
        root: folder holding cifar-10-batches-py/ or cifar-100-python/ (or that folder itself).
        split: "train" (50,000 images in the real data) or "test" (10,000).
        download: fetch the archive with torchvision first if needed.

    Returns:
        images uint8 [N, 3, 32, 32], labels int64 [N] (CIFAR-100: the fine labels), the class names.
    """
    if name not in CIFAR_SPECS:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose one of {tuple(CIFAR_SPECS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = CIFAR_SPECS[name]
    if download and not _is_complete(spec, root):
        download_cifar(name, root)
    folder = cifar_dir(spec, root)
    if not folder.is_dir():
        raise FileNotFoundError(f"{spec.name} folder {folder} not found. {_how_to_get(spec, Path(root))}")
    files = spec.train_files if split == "train" else spec.test_files
    parts = [_read_batch(folder / f, spec, Path(root)) for f in files]
    names = _read_names(folder, spec, Path(root))
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return images, labels, names

"""Progress bars: tqdm's where it is installed, else a silent stand-in with the same calls.

The library runs where only torch and the scientific stack are (the GPU machines' image has no tqdm): progress is
a convenience, never a reason for an import to fail.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

__all__ = ["tqdm"]


class _Silent:
    """What the library calls of a tqdm bar (iteration, ``update``, ``set_postfix``, ``close``, ``with``)."""

    def __init__(self, iterable: Iterable[Any] | None = None, *args: Any, **kwargs: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - exercised by tests/test_gpu_check.py with tqdm hidden
    tqdm = _Silent  # type: ignore[assignment,misc]

"""The worker processes of :mod:`.folder_run`: decoding images ahead of the engines (a DataLoader) and
post-processing their results behind them (a process pool).

The engines run in the main process; on a GPU a forward takes a few tens of milliseconds while decoding an
image and post-processing its ~1000 detections (thresholds, overlap removal, mask cleaning, RLE, the label
image) take longer on one core, so both run in other processes and the main process only runs the
engines and writes the JSON lines in input order.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["Decoded", "decoded", "Done", "post_pool"]


def _read_planes(path: Path) -> np.ndarray:
    """uint8 ``(Z, H, W)``: one plane for a 2-D image, Z for a multi-plane TIFF."""
    from ..io.images import read_stack

    return read_stack(path)


class Decoded:
    """A decoded file of the share: ``planes`` or the ``error`` that stopped it."""

    __slots__ = ("index", "path", "planes", "error")

    def __init__(self, index, path, planes, error):
        self.index, self.path, self.planes, self.error = index, path, planes, error


class _ReadDataset:
    """Image files decoded in DataLoader workers (a map-style dataset of :class:`Decoded`)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        path = self.paths[i]
        try:
            return Decoded(i, path, _read_planes(path), None)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported and skipped
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Decoded(i, path, None, reason)


def _first(batch):
    return batch[0]


def decoded(paths: Sequence[Path], workers: int) -> Iterator[Decoded]:
    """The files decoded in order; with ``workers > 0`` in a DataLoader's worker processes, ahead of
    the engines (``2 * workers`` files in flight)."""
    ds = _ReadDataset(paths)
    if workers <= 0 or len(ds) <= 1:
        for i in range(len(ds)):
            yield ds[i]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=min(workers, len(ds)),
                        collate_fn=_first, prefetch_factor=2, persistent_workers=False)
    yield from loader


class Done:
    """A finished result with the interface of a ``concurrent.futures.Future`` (post-processing in
    this process)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value

    def done(self) -> bool:
        return True


def post_pool(workers: int):
    """A process pool of ``workers`` post-processing processes (None for 0). Forked on Linux (the
    children never touch the GPU: post-processing is NumPy/SciPy), spawned elsewhere."""
    if workers <= 0:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))

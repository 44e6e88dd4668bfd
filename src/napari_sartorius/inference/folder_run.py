"""Folder inference at scale: streamed, resumable, sharded over ranks (``torchrun``), flat memory
(the output folder's lock, parts and merge are in :mod:`.folder_parts`).

:func:`segment_folder` segments a list of image files with an ensemble of engines and writes, into an
output folder:

* ``<stem>_labels.tif`` per file (post-processed, non-overlapping; a multi-plane TIFF gives a label
  *stack* ``(Z, H, W)`` whose ids are unique over the stack), each written to a temporary name and
  renamed, so a label image is either complete or absent;
* ``parts/rank<r>.jsonl``: one JSON line per finished file (its planes with their COCO results),
  appended and fsynced *after* the file's label image is in place. A line is the proof that a file is
  done: ``resume=True`` skips the files that have one in any ``parts/rank*.jsonl`` (whatever the number
  of ranks of the earlier run); a line cut short by a kill is ignored and truncated;
* ``parts/failures.rank<r>.jsonl``: the files that could not be read or segmented (one line each; the
  run goes on, and a resumed run tries them again);
* at the end, rank 0 (after every rank has finished its share) merges the parts, in input order, into
  ``predictions.json`` (a COCO results list, image ids 1, 2, ... over the files' planes; written to a
  temporary name and renamed) and the failures into ``failures.txt``.

Memory stays flat: predictions go to disk image by image, and the merge holds one line at a time plus
an index of (file, offset) per image.

Sharding: rank ``r`` of ``w`` takes files ``r, r + w, r + 2w, ...`` of the sorted input list. Under
``torchrun`` the ranks meet twice through the process group (gloo on the CPU, NCCL on GPUs): once after
rank 0 has taken the output folder's lock, once at the end before the merge. A rank that dies makes
the others stop at that meeting (or torchrun stops them); nothing finished is lost, and the same command
with ``resume=True`` (``--resume``) does the rest.

Two runs writing to one folder: rank 0 holds ``.segment.lock`` (pid, host, start time) for the whole run;
a second run stops with a message naming the holder. A lock left by a run that was killed on this host
(its pid is gone) is taken over.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..io.atomic import atomic_path
from .folder_parts import (
    FAILURES,
    LOCK_NAME,
    PARTS_DIR,
    PREDICTIONS,
    FolderRunError,
    OutputLock,
    OutputLocked,
    _append_bytes,
    _append_line,
    _clear_temporaries,
    _disk_full,
    _disk_full_error,
    _failure_path,
    _line,
    _part_files,
    _part_path,
    _truncate_partial_tail,
    done_files,
    merge_parts,
)
from .folder_workers import Decoded, Done, decoded, post_pool

__all__ = [
    "FolderSettings",
    "FolderResult",
    "FolderRunError",
    "OutputLocked",
    "OutputLock",
    "SoloGroup",
    "shard",
    "done_files",
    "segment_folder",
    "merge_parts",
    "FAILURES",
    "LOCK_NAME",
    "PARTS_DIR",
    "PREDICTIONS",
]

#: A step inside an image is shown when this many seconds passed since the last line (display only).
STEP_LINE_SECONDS = 5.0


@dataclass(frozen=True)
class FolderSettings:
    """What :func:`segment_folder` does with each image (the ``segment`` command's options).

    Attributes:
        tta, ensemble, iou, weights: as :func:`~napari_sartorius.inference.segment.segment_image`
            (``tta``, ``ensemble``, ``iou_thr``, ``weights``).
        cell_type: None (each plane's majority predicted class) or a class name.
        raw: write every raw instance (no post-processing, overlaps kept) and no label images.
        batch: images per network pass for one engine without TTA: consecutive 2-D images of one size
            (not tiled) go through ``predict_batch`` together, which keeps a GPU busy (default 1).
    """

    tta: str = "none"
    ensemble: str = "wbf"
    iou: float = 0.5
    weights: tuple[float, ...] | None = None
    cell_type: str | None = None
    raw: bool = False
    batch: int = 1


@dataclass
class FolderResult:
    """What a rank did, and (rank 0) what the merge found.

    Attributes:
        processed: files this rank segmented in this run.
        skipped: files of this rank's share already done (``resume``).
        failed: ``(file name, reason)`` of this rank's failures in this run.
        merged_images: planes in ``predictions.json`` (rank 0; else 0).
        merged_cells: instances in ``predictions.json`` (rank 0; else 0).
        failures_total: files listed in ``failures.txt`` (rank 0; else 0).
        predictions: the ``predictions.json`` path (rank 0), else None.
    """

    processed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    merged_images: int = 0
    merged_cells: int = 0
    failures_total: int = 0
    predictions: Path | None = None


# -- ranks ----------------------------------------------------------------------------------------


class SoloGroup:
    """The process group of a single-process run (``rank 0 of 1``): meetings are no-ops."""

    rank = 0
    world = 1

    def all_ok(self, ok: bool) -> bool:
        return bool(ok)

    def barrier(self) -> None:
        return None


class TorchGroup:
    """The ranks of a ``torch.distributed`` process group (see :mod:`~napari_sartorius.training.distributed`).

    ``device`` is where collective tensors live (the rank's GPU under NCCL, the CPU under gloo).
    """

    def __init__(self, device) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is true on every rank."""
        import torch

        t = torch.tensor([1 if ok else 0], device=self.device)
        try:
            self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN)
        except Exception as exc:  # noqa: BLE001 - a dead peer shows up as any of several errors
            raise _rank_stopped(exc) from None
        return bool(t.item())

    def barrier(self) -> None:
        self.all_ok(True)


def _rank_stopped(exc: BaseException) -> FolderRunError:
    reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
    return FolderRunError(
        f"another rank stopped before the end ({reason}); finished images are kept: run the same "
        "command again with --resume"
    )


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank ``rank``'s share of ``items``: indices ``rank, rank + world, ...`` (disjoint, covering)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}: need 0 <= rank < world size")
    return list(items[rank::world])


# -- images -----------------------------------------------------------------------------------------


def _write_label_stack(labels: list[np.ndarray], path: Path) -> None:
    """One ``(H, W)`` label image, or a ``(Z, H, W)`` stack, written atomically."""
    from ..io.label_images import write_label_image

    if len(labels) == 1:
        write_label_image(labels[0], path)
        return
    import tifffile

    top = max(int(lab.max()) if lab.size else 0 for lab in labels)
    stack = np.stack(labels).astype(np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, stack, compression="zlib", metadata=None, photometric="minisblack")


def _plane_name(path: Path, z: int, n: int) -> str:
    """The ``file_name`` of plane ``z`` of ``n`` in the results: the file's name for a 2-D image,
    ``<stem>_z<z><suffix>`` for a plane of a stack."""
    return path.name if n == 1 else f"{path.stem}_z{z}{path.suffix}"


# -- segmenting a share ----------------------------------------------------------------------------


def _plane_records(inst, key: str, class_names, cell_type) -> list[dict]:
    from ..annotations import AnnotationSet, ImageAnnotations
    from ..io.coco import annotation_set_to_results

    aset = AnnotationSet([ImageAnnotations(key, inst, cell_type=cell_type, file_name=key)], class_names=class_names)
    recs = annotation_set_to_results(aset, {key: 0}, with_file_name=False)
    for r in recs:
        r.pop("image_id", None)
    return recs


def _forward_planes(planes: np.ndarray, engines, settings: FolderSettings, on_step) -> list:
    """The raw (fused, not post-processed) instances of each plane of a file."""
    from ..inference.segment import run_to_completion, segment_image

    return [
        run_to_completion(
            segment_image(plane, engines, weights=settings.weights, tta=settings.tta, ensemble=settings.ensemble,
                          iou_thr=settings.iou, plane=z if len(planes) > 1 else None),
            on_step,
        )
        for z, plane in enumerate(planes)
    ]


def _finish_file(raws, planes: np.ndarray, path: Path, class_names, settings: FolderSettings, labels_path):
    """Post-process a file's planes, write its label image (unless ``settings.raw``) and serialise its
    line of the part file: the work behind the engines, run in this process or in a post-processing
    worker. Returns ``(line bytes, cells, planes)``, or the ValueError raised."""
    try:
        done = _finish_planes(raws, planes, path, class_names, settings)
    except ValueError as exc:  # a bad image (values the post-processing rejects): skip it, keep going
        return exc
    if not settings.raw:
        _write_label_stack([pl[0] for pl in done], labels_path)
    record = {
        "file": path.name,
        "planes": [{"name": _plane_name(path, z, len(done)), "size": list(pl[4]), "cell_type": pl[2],
                    "results": pl[1]} for z, pl in enumerate(done)],
    }
    return _line(record), sum(pl[3] for pl in done), len(done)


def _finish_planes(raws, planes: np.ndarray, path: Path, class_names, settings: FolderSettings):
    """Post-process the raw instances of each plane: ``(labels or None, records, cell type, n, (H, W))``."""
    from ..postprocess import PostprocessSettings, majority_class, postprocess

    post = PostprocessSettings(class_names=class_names, cell_type=settings.cell_type)
    out = []
    offset = 0
    for z, (raw, plane) in enumerate(zip(raws, planes)):
        labels = None
        if settings.raw:
            inst = raw
        else:
            res = postprocess(raw, post)
            inst = res.to_instances()
            labels = res.labels
            if len(planes) > 1 and labels.size:  # ids unique over the stack, as the dock's
                n = int(labels.max())
                labels = np.where(labels > 0, labels.astype(np.int64) + offset, 0)
                offset += n
        if settings.cell_type is not None:
            ctype = settings.cell_type
        else:
            k = majority_class(inst, len(class_names))
            ctype = None if k is None else class_names[k]
        name = _plane_name(path, z, len(planes))
        records = _plane_records(inst, name, class_names, ctype)
        # the cells written: a raw detection whose mask is empty at 0.5 has no COCO record
        out.append((labels, records, ctype, len(records), plane.shape[:2]))
    return out


def _batched(items: Iterator[Decoded], engines, settings: FolderSettings) -> Iterator[list[Decoded]]:
    """Groups of decoded files run in one pass: up to ``settings.batch`` consecutive 2-D images of one
    size when one engine runs without TTA and the image needs no tiles; any other file alone."""
    from .tiling import DEFAULT_MAX_TILE, needs_tiling

    can = settings.batch > 1 and len(engines) == 1 and settings.tta == "none"
    group: list[Decoded] = []
    for item in items:
        ok = (can and item.error is None and item.planes.shape[0] == 1
              and not needs_tiling(item.planes.shape[1:3], DEFAULT_MAX_TILE))
        if group and (not ok or item.planes.shape[1:] != group[0].planes.shape[1:] or len(group) >= settings.batch):
            yield group
            group = []
        if ok:
            group.append(item)
        else:
            yield [item]
    if group:
        yield group


def _segment_group(group: list[Decoded], engines, settings: FolderSettings, on_step, out: Path, pool) -> list:
    """Run the engines on a group of files, then hand each file's post-processing and label image to
    ``pool`` (a process pool, or None: here and now). Per file: a future of its serialised line, cells
    and planes (see :func:`_finish_file`) or of the ValueError that stopped it."""
    names = tuple(engines[0].class_names)
    if len(group) == 1:
        try:
            raws = [_forward_planes(group[0].planes, engines, settings, on_step)]
        except ValueError as exc:  # a bad image (shape, values): skip it, keep going
            return [Done(exc)]
    else:
        from .tta import predict_checked

        raws = [[raw] for raw in predict_checked(engines[0], [item.planes[0] for item in group])]  # one pass
    futures = []
    for r, item in zip(raws, group):
        args = (r, item.planes, item.path, names, settings, out / f"{item.path.stem}_labels.tif")
        futures.append(pool.submit(_finish_file, *args) if pool is not None else Done(_finish_file(*args)))
    return futures


def segment_folder(
    images: Sequence[Path],
    engines: Sequence,
    out: str | os.PathLike,
    settings: FolderSettings = FolderSettings(),
    *,
    group=None,
    resume: bool = False,
    workers: int = 0,
    post_workers: int | None = None,
    say: Callable[[str], None] | None = None,
) -> FolderResult:
    """Segment this rank's share of ``images`` into ``out`` and (rank 0) merge every rank's results.

    Args:
        images: the image files of the whole run, in the order of the merged results; every rank must
            pass the same list. Names must be unique (outputs are named by stem).
        engines: objects of the engine contract (``name``, ``class_names``, ``predict_batch``).
        out: the output folder (created).
        settings: what is done with each image.
        group: the ranks (:class:`SoloGroup` by default; :class:`TorchGroup` under torchrun).
        resume: skip the files that an earlier run of this folder finished; without it, the parts of an
            earlier run are deleted first and every file is segmented again.
        workers: DataLoader worker processes decoding images ahead of the engines (0: in this process).
        post_workers: processes post-processing the engines' results and writing their label images
            behind the engines, while the engines go on with the next images (0: in this process, one
            image after the other; default: as many as ``workers``). Lines and ``predictions.json``
            keep the input order either way.
        say: one progress line at a time (default: stderr).

    Returns:
        This rank's :class:`FolderResult` (rank 0's carries the merge).

    Raises:
        OutputLocked: another run is writing ``out``.
        FolderRunError: disk full, another rank stopped, or files without results at the merge.
    """
    group = group or SoloGroup()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out)
    images = [Path(p) for p in images]
    engines = list(engines)
    rank, world = group.rank, group.world
    tag = f"rank {rank}/{world}: " if world > 1 else ""

    lock = OutputLock(out)
    if rank == 0:
        ok = False
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if lock.took_over:
                say(f"took over the lock of an earlier run that was stopped ({lock.took_over})")
            _clear_temporaries(out)
            if not resume:
                for p in _part_files(out, "rank") + _part_files(out, "failures.rank"):
                    p.unlink()
            (out / PARTS_DIR).mkdir(exist_ok=True)
            ok = True
        finally:
            if not group.all_ok(ok):
                lock.release()
    elif not group.all_ok(True):
        raise OutputLocked(f"rank 0 could not start writing {out} (see its message)")
    try:
        post = workers if post_workers is None else post_workers
        if post < 0:
            raise ValueError(f"post_workers {post_workers}: give 0 or more")
        result = _run_share(images, engines, out, settings, group, resume, workers, post, say, tag)
        group.barrier()  # every share finished (a dead rank raises here)
        if rank == 0:
            merged = merge_parts(images, out)
            result.merged_images, result.merged_cells, result.failures_total, result.predictions = merged
        return result
    finally:
        lock.release()


def _run_share(images, engines, out, settings, group, resume, workers, post_workers, say, tag) -> FolderResult:
    result = FolderResult()
    mine = shard(images, group.rank, group.world)
    done = done_files(out) if resume else set()
    todo = [p for p in mine if p.name not in done]
    result.skipped = len(mine) - len(todo)
    skip = f", {result.skipped} already done" if result.skipped else ""
    if group.world > 1 or result.skipped:
        say(f"{tag}{len(mine)} of {len(images)} image(s) in this share{skip}")
    part = _part_path(out, group.rank)
    failures = _failure_path(out, group.rank)
    _truncate_partial_tail(part)
    _truncate_partial_tail(failures)
    last_line = [time.monotonic()]
    first = [True]

    def on_step(p) -> None:  # engine x TTA variant steps inside an image (the dock's progress)
        now = time.monotonic()
        if p.total > 1 and (first[0] or now - last_line[0] >= STEP_LINE_SECONDS):
            say(f"{tag}  step {p.step}/{p.total}: {p.message}")
            last_line[0] = now
        if p.warning:
            say(f"{tag}warning: {p.warning}")

    counter = [0]

    def emit(batch, futures, t0, part_fh, fail_fh) -> None:
        """Write the results of one group of files, in input order (waiting for their post-processing)."""
        outcomes = [f.result() if f is not None else None for f in futures]
        seconds = (time.perf_counter() - t0) / len(batch)
        for item, outcome in zip(batch, outcomes):
            counter[0] += 1
            where = f"{tag}[{counter[0]}/{len(todo)}] {item.path.name}"
            if isinstance(outcome, ValueError):
                item.error = str(outcome).strip().splitlines()[0] if str(outcome).strip() else "ValueError"
            if item.error is not None:
                say(f"{where}: skipped, {item.error}")
                _append_line(fail_fh, {"file": item.path.name, "error": item.error})
                result.failed.append((item.path.name, item.error))
                continue
            line, cells, n_planes = outcome
            _append_bytes(part_fh, line)  # the label image is in place (written by _finish_file): the line proves it
            result.processed += 1
            zs = f" in {n_planes} planes" if n_planes > 1 else ""
            per = f" ({len(batch)} images per pass)" if len(batch) > 1 else ""
            say(f"{where}: {cells} cells{zs} in {seconds:.1f} s{per}")

    pool = post_pool(post_workers)
    if pool is not None:
        pool.submit(int).result()  # start the workers now, before the decoding workers and their threads
    depth = 2 * post_workers  # groups in flight behind the engines (memory stays bounded)
    pending: deque = deque()
    clean = False
    try:
        with open(part, "ab") as part_fh, open(failures, "ab") as fail_fh:
            for batch in _batched(decoded(todo, workers), engines, settings):
                t0 = time.perf_counter()
                futures = _segment_group(batch, engines, settings, on_step, out, pool) if batch[0].error is None else [None]
                first[0] = False
                pending.append((batch, futures, t0))
                while pending and (len(pending) > depth or all(f is None or f.done() for f in pending[0][1])):
                    emit(*pending.popleft(), part_fh, fail_fh)
                del batch, futures
            while pending:
                emit(*pending.popleft(), part_fh, fail_fh)
        clean = True
    except BrokenProcessPool:
        raise FolderRunError(
            "a post-processing worker process died (out of memory?); finished images are kept: run the same "
            "command again with --resume, with fewer --workers"
        ) from None
    except OSError as exc:
        if _disk_full(exc):
            raise _disk_full_error(Path(exc.filename) if exc.filename else out, exc) from None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=clean, cancel_futures=not clean)
    return result



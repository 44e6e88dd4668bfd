"""The output folder of :mod:`.folder_run`: its lock, the per-rank JSON-lines parts and their merge.

Layout of ``DIR``: ``.segment.lock`` (held by rank 0 for the run), ``parts/rank<r>.jsonl`` (one line per
finished file: ``{"file", "planes": [{"name", "size", "cell_type", "results"}]}``),
``parts/failures.rank<r>.jsonl`` (``{"file", "error"}``), and after the merge ``predictions.json``,
``failures.txt`` and ``summary.csv`` (cells, mean and p90 uncertainty per image, :mod:`.uncertainty`). A line counts only when complete (newline-terminated, valid JSON): a kill while
appending leaves a partial last line, which readers skip and the rank truncates when it resumes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..io.atomic import atomic_write
from .uncertainty import image_summary, write_summary_csv

__all__ = [
    "FolderRunError",
    "OutputLocked",
    "OutputLock",
    "done_files",
    "merge_parts",
    "LOCK_NAME",
    "PARTS_DIR",
    "PREDICTIONS",
    "FAILURES",
]

LOCK_NAME = ".segment.lock"
PARTS_DIR = "parts"
PREDICTIONS = "predictions.json"
FAILURES = "failures.txt"
SUMMARY = "summary.csv"

class FolderRunError(RuntimeError):
    """The run cannot go on (disk full, a rank stopped, outputs incomplete): a one-line reason that
    says what to do."""


class OutputLocked(FolderRunError):
    """Another run holds the output folder's lock."""


# -- the output folder's lock ---------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


class OutputLock:
    """``<folder>/.segment.lock``, created atomically with this process's pid, host and start time.

    :meth:`acquire` raises :class:`OutputLocked` when another live run holds it; a lock whose pid is
    gone on this host (a killed run) is taken over and :attr:`took_over` describes it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.took_over: str | None = None
        self._held = False

    def _read(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(json.dumps(me))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(tmp, self.path)  # fails when the lock exists: creation with content, atomic
                self._held = True
                return
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            other = self._read()
            if other is not None and other.get("host") == me["host"] and isinstance(other.get("pid"), int) \
                    and not _pid_alive(other["pid"]):
                self.took_over = f"pid {other['pid']} (started {other.get('started', '?')}) is gone"
                self.path.unlink(missing_ok=True)
                continue
            who = (f"pid {other.get('pid')} on {other.get('host')} since {other.get('started')}"
                   if other else "an unreadable lock")
            raise OutputLocked(
                f"{self.path.parent} is being written by another segment run ({who}): wait for it to end, "
                f"use another --out, or delete {self.path} if that run is gone"
            )
        raise OutputLocked(f"could not take the lock {self.path}: delete it if no run is writing there")

    def release(self) -> None:
        if self._held:
            info = self._read()
            if info is not None and info.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False


# -- parts ----------------------------------------------------------------------------------------


def _part_path(out: Path, rank: int) -> Path:
    return out / PARTS_DIR / f"rank{rank}.jsonl"


def _failure_path(out: Path, rank: int) -> Path:
    return out / PARTS_DIR / f"failures.rank{rank}.jsonl"


def _complete_lines(path: Path) -> Iterator[tuple[int, int, dict]]:
    """``(offset, length, record)`` of each complete, valid JSON line of ``path`` (a line cut short by a
    kill, i.e. without its newline or not valid JSON, is skipped)."""
    offset = 0
    with open(path, "rb") as fh:
        for line in fh:
            n = len(line)
            if line.endswith(b"\n"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if isinstance(rec, dict) and "file" in rec:
                    yield offset, n, rec
            offset += n


def _part_files(out: Path, prefix: str) -> list[Path]:
    folder = out / PARTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{prefix}*.jsonl") if p.name.startswith(prefix))


def done_files(out: str | os.PathLike) -> set[str]:
    """Names of the files with a complete line in any ``parts/rank*.jsonl`` of ``out``."""
    done: set[str] = set()
    for part in _part_files(Path(out), "rank"):
        done.update(rec["file"] for _, _, rec in _complete_lines(part))
    return done


def _truncate_partial_tail(path: Path) -> None:
    """Cut a last line left without its newline (the process was killed while appending it)."""
    if not path.is_file():
        return
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        keep = 0
        for offset, n, _ in _complete_lines(path):
            keep = offset + n
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())


def _line(record: dict) -> bytes:
    """One line of a part file: compact JSON, newline-terminated, UTF-8."""
    return (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")


def _append_bytes(fh, line: bytes) -> None:
    """Append one serialised line (:func:`_line`) and make it durable before going on."""
    fh.write(line)
    fh.flush()
    os.fsync(fh.fileno())


def _append_line(fh, record: dict) -> None:
    _append_bytes(fh, _line(record))


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _disk_full_error(what: Path, exc: OSError) -> FolderRunError:
    return FolderRunError(
        f"disk full while writing {what} ({exc.strerror}); every image written so far is complete: free "
        "some space and run the same command again with --resume"
    )


def _clear_temporaries(out: Path) -> None:
    """Remove temporary files left in ``out`` by a killed run (only called under the lock)."""
    for folder in (out, out / PARTS_DIR):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


# -- merge ------------------------------------------------------------------------------------------


class _Revalidate(Exception):
    """The merge from lines indexed by their file name alone cannot go on as it is (a line turned out not
    to be valid JSON of that file, or a file has no line): redo it validating every line first, so that
    what is written or reported is exactly what the validated index gives."""


_FILE_PREFIX = b'{"file":"'
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps(..., separators=...) builds one per call


def _line_file(line: bytes) -> str | None:
    """The ``file`` of a part line as :func:`_line` writes it (``{"file":"<name>",...``), read from the
    line's start without decoding the rest; None when the line does not start that way."""
    if not line.startswith(_FILE_PREFIX):
        return None
    end = line.find(b'",', len(_FILE_PREFIX))
    if end < 0:
        return None
    try:
        name = json.loads(line[len(_FILE_PREFIX) - 1 : end + 1])
    except ValueError:
        return None
    return name if isinstance(name, str) else None


def _index_by_name(out: Path) -> dict[str, list[tuple[Path, int, int]]]:
    """``file -> [(part, offset, length), ...]`` of every newline-terminated line of the result parts, in
    part and line order, each line decoded only when its name cannot be read from its start."""
    index: dict[str, list[tuple[Path, int, int]]] = {}
    for part in _part_files(out, "rank"):
        offset = 0
        with open(part, "rb") as fh:
            for line in fh:
                n = len(line)
                if line.endswith(b"\n"):
                    name = _line_file(line)
                    if name is None:
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            rec = None
                        if isinstance(rec, dict) and "file" in rec:
                            name = rec["file"]
                    if name is not None:
                        index.setdefault(name, []).append((part, offset, n))
                offset += n
    return index


def _read_line(handles: dict, where: tuple[Path, int, int]) -> bytes:
    part, offset, n = where
    src = handles.get(part) or handles.setdefault(part, open(part, "rb"))
    src.seek(offset)
    return src.read(n)


def merge_parts(images: Sequence[Path], out: str | os.PathLike) -> tuple[int, int, int, Path]:
    """Merge ``parts/`` into ``predictions.json`` (COCO results, input order, image ids 1, 2, ... over
    planes) and ``failures.txt``; both written atomically.

    Returns ``(planes, instances, failed files, predictions path)``.

    Raises:
        FolderRunError: a file has neither results nor a failure (a rank stopped early), or the disk is
            full; ``predictions.json`` is then left as it was.
    """
    out = Path(out)
    try:  # each line decoded once: indexed by the name at its start, decoded when written
        return _merge(images, out, _index_by_name(out), validated=False)
    except _Revalidate:  # a corrupt but newline-terminated line, or a file missing: validate every line first
        index = {}
        for part in _part_files(out, "rank"):
            for offset, n, rec in _complete_lines(part):
                index.setdefault(rec["file"], [(part, offset, n)])  # first line wins: never one image twice
        return _merge(images, out, index, validated=True)


def _merge(images: Sequence[Path], out: Path, index: dict, validated: bool) -> tuple[int, int, int, Path]:
    """:func:`merge_parts` from ``index`` (file -> candidate lines, the first valid one wins). Unless
    ``validated``, the candidates were not decoded yet: the first is, and :class:`_Revalidate` is raised
    when it is not a valid line of that file or when a file is missing (nothing has been written then)."""
    handles: dict[Path, object] = {}
    try:
        return _write_merged(images, out, index, validated, handles)
    finally:
        for h in handles.values():
            h.close()


def _decoded(handles: dict, index: dict, name: str, validated: bool) -> dict:
    line = _read_line(handles, index[name][0])
    if validated:
        return json.loads(line)
    try:
        rec = json.loads(line)
    except ValueError:
        rec = None
    if not (isinstance(rec, dict) and rec.get("file") == name):
        raise _Revalidate(name)
    return rec


def _write_merged(images, out: Path, index: dict, validated: bool, handles: dict) -> tuple[int, int, int, Path]:
    failed: dict[str, str] = {}
    for part in _part_files(out, "failures.rank"):
        for _, _, rec in _complete_lines(part):
            if rec["file"] not in index:
                failed[rec["file"]] = str(rec.get("error", ""))
    missing = [p.name for p in images if p.name not in index and p.name not in failed]
    if missing and not validated:
        raise _Revalidate(missing[0])  # the count in the message must be that of the validated index
    if missing:
        raise FolderRunError(
            f"{len(missing)} image(s) have no results yet (first: {missing[0]}); a rank stopped early: run the "
            "same command again with --resume"
        )
    if not validated:  # results of files outside ``images`` are not written: check them here
        wanted = {p.name for p in images}
        for name in index:
            if name not in wanted:
                _decoded(handles, index, name, validated)
    path = out / PREDICTIONS
    n_planes = n_cells = 0
    summary = []
    encode = _ENCODER.encode
    try:
        with atomic_write(path, "w") as fh:
            fh.write("[")
            sep = ""
            for p in images:
                if p.name not in index:
                    continue
                rec = _decoded(handles, index, p.name, validated)
                for plane in rec["planes"]:
                    n_planes += 1
                    unc, scores, areas = [], [], []
                    for r in plane["results"]:
                        r = dict(r, image_id=n_planes, file_name=plane["name"])
                        fh.write(sep + encode(r))
                        sep = ",\n"
                        n_cells += 1
                        if r.get("uncertainty") is not None:
                            unc.append(float(r["uncertainty"]))
                        scores.append(float(r.get("score", np.nan)))
                        areas.append(float(r.get("area", np.nan)))
                    defined = bool(unc) and len(unc) == len(plane["results"])
                    summary.append(image_summary(plane["name"], np.asarray(unc) if defined else None,
                                                 count=len(plane["results"]), scores=np.asarray(scores),
                                                 areas=np.asarray(areas)))
            fh.write("]\n")
        write_summary_csv(summary, out / SUMMARY)  # which images to correct first
        fail_path = out / FAILURES
        if failed:
            with atomic_write(fail_path, "w") as fh:
                for p in images:
                    if p.name in failed:
                        fh.write(f"{p.name}: {failed[p.name]}\n")
        else:
            fail_path.unlink(missing_ok=True)
    except OSError as exc:
        if _disk_full(exc):
            raise _disk_full_error(path, exc) from None
        raise
    return n_planes, n_cells, len(failed), path

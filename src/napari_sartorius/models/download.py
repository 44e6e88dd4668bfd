"""Download, verify and cache the registry's pretrained weights (:mod:`.zoo`); no GUI, plain callbacks.

Cache layout (folder from :func:`cache_dir`)::

    <cache>/downloads/<entry.filename>     the file as published (also where a hand-copied file goes)
    <cache>/checkpoints/<entry.name>.pt    the project checkpoint imported from it (detectron2 entries)

:func:`fetch_pretrained` returns a usable file, doing only what is missing:

1. the imported checkpoint exists and names the same source: returned at once (no torch import);
2. else the published file is in ``downloads/`` (an earlier download, or copied there by hand on an
   offline machine): it is verified and imported;
3. else it is downloaded, streamed to a temporary file beside its final name (SHA-256 computed on the
   way), checked (complete, not an HTML page, size/SHA-256 when the registry knows them), loaded
   without running code (``torch.load(weights_only=True)`` or the restricted unpickler) and imported
   completely (every tensor in its place) into a project checkpoint, and only then renamed to its
   final name. Any failure removes the temporary file: the cache never holds a partial or unverified
   file, and a good file there before is left untouched.

The SHA-256 of the source file is recorded in the checkpoint's provenance (``config.provenance`` and
``extra["pretrained"]``). Errors are :class:`PretrainedError` with a one-line message saying what to do.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..stopping import stop_requested
from .zoo import PretrainedEntry, get_entry

__all__ = [
    "ENV_HOME",
    "PretrainedError",
    "DownloadCancelled",
    "cache_dir",
    "download_path",
    "checkpoint_path",
    "download_file",
    "fetch_pretrained",
    "cached_status",
]

#: Environment variable that overrides the cache folder.
ENV_HOME = "NAPARI_SARTORIUS_HOME"

CHUNK = 1 << 20  # bytes per read
_TIMEOUT_S = 30.0  # per blocking socket operation, not for the whole download
_HTML_STARTS = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body", b"<error")

ProgressFn = Callable[[int, "int | None"], None]


class PretrainedError(Exception):
    """A pretrained model cannot be obtained or used; the message is one line that says what to do.

    (Not a RuntimeError: napari's workers swallow RuntimeErrors raised in a generator as "aborted".)"""


class DownloadCancelled(PretrainedError):
    """The download was stopped by its stop request (nothing was left in the cache)."""


# -- where -----------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The cache folder: ``$NAPARI_SARTORIUS_HOME`` if set, else the platform's cache folder.

    Windows ``%LOCALAPPDATA%\\napari-sartorius``, macOS ``~/Library/Caches/napari-sartorius``,
    elsewhere ``$XDG_CACHE_HOME/napari-sartorius`` (default ``~/.cache/napari-sartorius``).
    The folder is not created here.
    """
    env = os.environ.get(ENV_HOME, "").strip()
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "napari-sartorius"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "napari-sartorius"
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base).expanduser() / "napari-sartorius"


def download_path(entry: PretrainedEntry | str) -> Path:
    """Where the published file of ``entry`` lies in the cache (and where a hand-copied file is picked up)."""
    entry = get_entry(entry) if isinstance(entry, str) else entry
    return cache_dir() / "downloads" / entry.filename


def checkpoint_path(entry: PretrainedEntry | str) -> Path:
    """Where the project checkpoint imported from ``entry`` lies (detectron2 entries)."""
    entry = get_entry(entry) if isinstance(entry, str) else entry
    return cache_dir() / "checkpoints" / f"{entry.name}.pt"


def cached_status(entry: PretrainedEntry | str) -> str:
    """``"ready"`` (usable at once), ``"downloaded"`` (the file is there, not imported yet) or ``"-"``."""
    entry = get_entry(entry) if isinstance(entry, str) else entry
    if entry.kind == "detectron2":
        if _checkpoint_current(entry, checkpoint_path(entry)):
            return "ready"
        return "downloaded" if download_path(entry).is_file() else "-"
    return "ready" if download_path(entry).is_file() else "-"


# -- downloading -----------------------------------------------------------------------------------
def _write_chunk(fh, data: bytes) -> None:
    """Write one chunk (a seam the tests use to simulate a full disk)."""
    fh.write(data)


def _offline_hint(url: str, dest: Path) -> str:
    # every message that carries this hint names the URL already
    return f"without network here, download that file elsewhere and copy it to {dest}"


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip().lower().startswith(_HTML_STARTS)


def _check_free_space(folder: Path, need: int | None, dest: Path) -> None:
    if need is None:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need + (16 << 20):  # keep 16 MB spare for the imported checkpoint's metadata
        raise PretrainedError(
            f"not enough free disk space for {dest.name} ({need / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free "
            f"in {folder}): free some space or set {ENV_HOME} to a folder on another disk"
        )


def download_file(
    url: str,
    dest: str | Path,
    *,
    size_bytes: int | None = None,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    progress: ProgressFn | None = None,
    stop=None,
    timeout: float = _TIMEOUT_S,
) -> tuple[Path, str]:
    """Stream ``url`` into a temporary file beside ``dest`` and check it; the caller renames it.

    Args:
        url: http(s) URL.
        dest: the final file name (its folder is created); it is NOT written here.
        size_bytes, sha256, sha256_prefix: what the file must be, where known.
        progress: called as ``progress(bytes_done, bytes_total_or_None)`` after every chunk.
        stop: a stop request (``threading.Event`` or callable); checked between chunks.
        timeout: seconds each connect/read may block.

    Returns:
        ``(temporary path, sha256 hex)``: the checked file, in ``dest``'s folder. The caller moves it
        to ``dest`` (``os.replace``) or deletes it.

    Raises:
        PretrainedError: HTTP error, no network, truncated transfer, an HTML page instead of the file,
            a size or SHA-256 mismatch, a full disk; :class:`DownloadCancelled` when stopped. In every
            case the temporary file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    hint = _offline_hint(url, dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PretrainedError(f"cannot create the cache folder {dest.parent} ({exc.strerror or exc}): set {ENV_HOME} "
                              "to a writable folder") from exc
    request = urllib.request.Request(url, headers={"User-Agent": "napari-sartorius"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise PretrainedError(f"{url} answered HTTP {exc.code} {exc.reason}: the file is not there; {hint}") from exc
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise PretrainedError(f"cannot reach {url} ({reason}); {hint}") from exc
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    done = 0
    try:
        with response, os.fdopen(fd, "wb") as fh:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else size_bytes
            _check_free_space(dest.parent, total, dest)
            ctype = (response.headers.get("Content-Type") or "").lower()
            first = True
            while True:
                if stop_requested(stop):
                    raise DownloadCancelled(f"download of {url} cancelled; nothing was kept")
                try:
                    chunk = response.read(CHUNK)
                except (OSError, ValueError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                    raise PretrainedError(
                        f"download of {url} broke off after {done / 1e6:.1f} MB ({exc}); run it again "
                        f"(nothing was kept), or {hint}"
                    ) from exc
                if not chunk:
                    break
                if first:
                    first = False
                    if "text/html" in ctype or _looks_like_html(chunk[:64]):
                        raise PretrainedError(
                            f"{url} sent a web page instead of the weights (a login, error or moved-file page); "
                            f"{hint}"
                        )
                try:
                    _write_chunk(fh, chunk)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise PretrainedError(
                            f"the disk is full writing {dest.name} into {dest.parent} after {done / 1e6:.0f} MB: "
                            f"free some space or set {ENV_HOME} to a folder on another disk"
                        ) from exc
                    raise PretrainedError(f"cannot write {dest.name} into {dest.parent} ({exc.strerror or exc})") from exc
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            if length and length.isdigit() and done != int(length):
                raise PretrainedError(
                    f"download of {url} is truncated ({done} of {int(length)} bytes); run it again "
                    f"(nothing was kept), or {hint}"
                )
            fh.flush()
            os.fsync(fh.fileno())
        if done == 0:
            raise PretrainedError(f"{url} sent an empty file; {hint}")
        _check_identity(dest.name, done, digest.hexdigest(), size_bytes, sha256, sha256_prefix, url)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _check_identity(name, size, digest, size_bytes, sha256, sha256_prefix, url) -> None:
    if size_bytes is not None and size != size_bytes:
        raise PretrainedError(f"{name} has {size} bytes, the registry says {size_bytes}: the file at {url} changed "
                              "or the copy is incomplete")
    if sha256 is not None and digest != sha256.lower():
        raise PretrainedError(f"{name} has SHA-256 {digest[:12]}..., the registry says {sha256[:12]}...: "
                              "a corrupted or different file")
    if sha256_prefix is not None and not digest.startswith(sha256_prefix.lower()):
        raise PretrainedError(f"{name} has SHA-256 {digest[:12]}..., its name says it starts with {sha256_prefix}: "
                              "a corrupted or different file")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- verifying and importing -----------------------------------------------------------------------
def _import_entry(entry: PretrainedEntry, source: Path, digest: str, out: Path) -> Path:
    """Load ``source`` without running code, import it completely and write the project checkpoint ``out``."""
    from .checkpoint import save_checkpoint
    from .detectron2_import import load_detectron2_model

    try:
        model, config, report = load_detectron2_model(source, entry.config, entry.classes)
    except (ValueError, FileNotFoundError) as exc:  # Detectron2ImportError, UnsupportedConfigError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedError(
            f"the file for {entry.name} is not a {entry.arch} checkpoint with {entry.num_classes} class(es) "
            f"({first}); nothing was kept"
        ) from exc
    facts = {
        "pretrained": entry.name,
        "url": entry.url,
        "file": entry.filename,
        "sha256": digest,
        "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    provenance = dict(config.provenance)
    provenance.update({"source": f"pretrained {entry.name}", **facts})
    config = config.replace(provenance=provenance)
    extra = {
        "pretrained": {**facts, "licence": entry.provenance},
        "imported_from": {"tensors": len(report.mapped), "ignored": report.ignored, "warnings": report.warnings},
    }
    try:
        return save_checkpoint(out, model, config, extra=extra)
    except OSError as exc:
        raise PretrainedError(f"cannot write {out} ({exc.strerror or exc}): free some space or set {ENV_HOME} "
                              "to another folder") from exc


def _verify_imagenet(entry: PretrainedEntry, source: Path) -> None:
    """Load ImageNet body weights with ``weights_only=True`` and check they fill the entry's body."""
    import torch

    from .architectures import build_model, load_backbone_weights
    from .config import ModelConfig

    try:
        with torch.device("meta"):
            model = build_model(ModelConfig(entry.arch))
        load_backbone_weights(model, source)
    except (ValueError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedError(f"the file for {entry.name} is not {entry.arch}'s ImageNet body ({first}); "
                              "nothing was kept") from exc


def _checkpoint_current(entry: PretrainedEntry, ckpt: Path) -> bool:
    """True when ``ckpt`` is there and was imported from this entry (its sidecar names the URL)."""
    marker = _marker(ckpt)
    if not (ckpt.is_file() and marker.is_file()):
        return False
    try:
        url = marker.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError):
        return False
    return url == entry.url


def _marker(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".source")


def _write_marker(ckpt: Path, entry: PretrainedEntry, digest: str) -> None:
    from ..io.atomic import atomic_write

    with atomic_write(_marker(ckpt)) as fh:
        fh.write(f"{entry.url}\nsha256 {digest}\n")


def fetch_pretrained(
    name: str | PretrainedEntry,
    *,
    out: str | Path | None = None,
    progress: ProgressFn | None = None,
    stop=None,
    message: Callable[[str], None] | None = None,
) -> Path:
    """A ready-to-use file for registry entry ``name``, downloading and importing only what is missing.

    Args:
        name: a registry name (``livecell-shsy5y``, ``coco-r50-fpn``, ``imagenet-r50``, ...) or entry.
        out: also copy the result to this path (``pretrained get --out``); written atomically.
        progress: ``progress(bytes_done, bytes_total_or_None)`` during a download.
        stop: stop request (``threading.Event`` or callable), checked between chunks.
        message: called with a sentence at each step (download, import), e.g. ``print``.

    Returns:
        detectron2 entries: the cached project checkpoint (or ``out``); ImageNet entries: the verified
        torchvision state-dict file (or ``out``).

    Raises:
        ValueError: not a registry name.
        PretrainedError: the file cannot be obtained or is not what the registry says (one line, with
            the URL and the path where a hand-copied file is picked up when the network is the cause).
    """
    entry = get_entry(name) if isinstance(name, str) else name
    say = message or (lambda _text: None)
    raw = download_path(entry)
    ckpt = checkpoint_path(entry)
    if entry.kind == "detectron2" and _checkpoint_current(entry, ckpt):
        result = ckpt
    elif raw.is_file():
        say(f"{entry.name}: using {raw}")
        result = _from_local_file(entry, raw, ckpt, say)
    else:
        say(f"{entry.name}: downloading {entry.url}")
        tmp, digest = download_file(
            entry.url, raw, size_bytes=entry.size_bytes, sha256=entry.sha256, sha256_prefix=entry.sha256_prefix,
            progress=progress, stop=stop,
        )
        try:
            if entry.kind == "detectron2":
                say(f"{entry.name}: importing into {ckpt}")
                _import_entry(entry, tmp, digest, ckpt)
                _write_marker(ckpt, entry, digest)
                result = ckpt
            else:
                _verify_imagenet(entry, tmp)
                result = raw
            os.replace(tmp, raw)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if out is not None:
        result = _copy_to(result, Path(out))
    return result


def _from_local_file(entry: PretrainedEntry, raw: Path, ckpt: Path, say) -> Path:
    """Verify a file already in ``downloads/`` (earlier download or hand copy) and import it."""
    digest = _sha256_of(raw)
    try:
        _check_identity(raw.name, raw.stat().st_size, digest, entry.size_bytes, entry.sha256, entry.sha256_prefix,
                        entry.url)
    except PretrainedError as exc:
        raise PretrainedError(f"{raw}: {exc}; delete it and fetch again") from exc
    if _looks_like_html(_head(raw)):
        raise PretrainedError(f"{raw} is a web page, not the weights: delete it and fetch again, or copy the file "
                              f"from {entry.url} there")
    if entry.kind != "detectron2":
        _verify_imagenet(entry, raw)
        return raw
    say(f"{entry.name}: importing into {ckpt}")
    try:
        _import_entry(entry, raw, digest, ckpt)
    except PretrainedError as exc:
        raise PretrainedError(f"{raw}: {exc}; delete it and fetch again, or copy the file from {entry.url}") from exc
    _write_marker(ckpt, entry, digest)
    return ckpt


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(64)


def _copy_to(src: Path, dest: Path) -> Path:
    if dest.resolve() == src.resolve():
        return dest
    from ..io.atomic import atomic_path

    if dest.is_dir():
        raise PretrainedError(f"--out {dest} is a folder: give a file name, e.g. {dest / src.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    except OSError as exc:
        raise PretrainedError(f"cannot write {dest} ({exc.strerror or exc})") from exc
    return dest

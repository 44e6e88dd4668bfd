"""``napari-sartorius pretrained list | get NAME [--out CKPT]`` and the ``--model NAME`` resolver.

:func:`resolve_model_arg` turns a registry name (``livecell-shsy5y``) given where a checkpoint path is
expected (``segment --model``, ``train --base``, ``init-model --imagenet``) into the cached file,
downloading and importing it the first time; paths and other values pass through unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser", "run", "resolve_model_arg", "tqdm_progress"]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def tqdm_progress():
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr, and a ``close()`` for it."""
    state: dict = {}

    def progress(done: int, total: int | None) -> None:
        bar = state.get("bar")
        if bar is None:
            from tqdm import tqdm

            bar = state["bar"] = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                                      leave=False)
            state["done"] = 0
        bar.update(done - state["done"])
        state["done"] = done

    def close() -> None:
        if "bar" in state:
            state.pop("bar").close()

    return progress, close


def resolve_model_arg(value: str | None, *, kinds=("detectron2",)) -> str | None:
    """``value`` itself when it is None or an existing path; the fetched file when it is a registry name.

    Args:
        value: a command-line value (checkpoint path, ``classical``, or a registry name).
        kinds: the registry kinds accepted here (``("detectron2",)`` for models, ``("imagenet",)`` for
            ``init-model --imagenet``).

    Raises:
        ValueError: a registry name of another kind.
        PretrainedError: the download or import failed (one line).
    """
    from ..models.zoo import get_entry, is_registry_name

    if value is None or Path(value).exists() or not is_registry_name(value):
        return value
    entry = get_entry(value, kinds=kinds)
    from ..models.download import fetch_pretrained

    progress, close = tqdm_progress()
    try:
        return str(fetch_pretrained(entry, progress=progress, message=_say))
    finally:
        close()


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrained",
        help="list, download and cache the pretrained models (LIVECell, detectron2 COCO, ImageNet bodies)",
        description="Pretrained weights by name. They are downloaded once into the cache folder "
        "($NAPARI_SARTORIUS_HOME, else the platform's cache), verified and imported; a registry name works "
        "wherever a checkpoint path does (segment --model, train --base, init-model --imagenet).",
    )
    sub = p.add_subparsers(dest="pretrained_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="every registry entry with its architecture, classes and cache state")
    ls.add_argument("--json", action="store_true", help="print one JSON list of the entries")
    get = sub.add_parser("get", help="download, verify and import NAME into the cache (pre-fetch for a cluster)")
    get.add_argument("name", help="registry name (see `pretrained list`)")
    get.add_argument("--out", metavar="CKPT", help="also write the checkpoint (or ImageNet weights) here")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.pretrained_command == "list":
        return _list(args)
    return _get(args)


def _list(args) -> int:
    from ..models.download import cache_dir, cached_status, download_path
    from ..models.zoo import REGISTRY

    if args.json:
        rows = []
        for e in REGISTRY.values():
            rows.append({
                "name": e.name, "kind": e.kind, "arch": e.arch, "classes": list(e.classes), "url": e.url,
                "config": e.config, "size_bytes": e.size_bytes, "approx_mb": e.approx_mb, "sha256": e.sha256,
                "description": e.description, "provenance": e.provenance, "cached": cached_status(e),
                "download_path": str(download_path(e)),
            })  # fmt: skip
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(n) for n in REGISTRY)
    arch_w = max(len(e.arch) for e in REGISTRY.values())
    print(f"{'name'.ljust(width)}  {'architecture'.ljust(arch_w)}  classes  cached      description")
    for e in REGISTRY.values():
        classes = str(e.num_classes) if e.classes else "-"
        print(f"{e.name.ljust(width)}  {e.arch.ljust(arch_w)}  {classes.rjust(7)}  {cached_status(e).ljust(10)}  "
              f"{e.description}")
    print(f"\ncache: {cache_dir()} (set NAPARI_SARTORIUS_HOME to move it); offline: copy a file from its URL "
          "(`pretrained list --json`) into downloads/ there")
    return 0


def _get(args) -> int:
    from ..models.download import fetch_pretrained
    from ..models.zoo import get_entry

    entry = get_entry(args.name)
    progress, close = tqdm_progress()
    try:
        path = fetch_pretrained(entry, out=args.out, progress=progress, message=_say)
    finally:
        close()
    what = "checkpoint" if entry.kind == "detectron2" else "ImageNet weights"
    print(f"{entry.name}: {what} ready at {path}")
    return 0

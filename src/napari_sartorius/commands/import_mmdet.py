"""``napari-sartorius import-mmdet``: turn an MMDetection checkpoint into this project's format."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the command on the CLI's subparsers."""
    x = subparsers.add_parser(
        "import-mmdet",
        help="turn an MMDetection (2.x/3.x) Mask R-CNN checkpoint (.pth) into this project's format",
    )
    x.add_argument("weights", help="MMDetection checkpoint (.pth)")
    x.add_argument(
        "--config",
        help="the .py config it was trained with, or a bundled model-zoo name such as "
        "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py (default: the config stored in the checkpoint)",
    )
    x.add_argument("--out", required=True, help="checkpoint file to write")
    x.add_argument("--classes", help="comma-separated class names in training order (default: those stored in the checkpoint)")
    x.set_defaults(func=run)
    return x


def run(args) -> int:
    """Import ``args.weights``; print the file written and the import's warnings. Returns 0."""
    import warnings

    from ..models.mmdet_import import import_mmdet

    classes = None
    if args.classes is not None:
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
        if not classes:
            raise ValueError("--classes: give at least one class name")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = import_mmdet(Path(args.weights), Path(args.out), config_path=args.config, class_names=classes)
    for w in caught:
        print(f"warning: {w.message}")
    print(f"wrote {path}")
    return 0

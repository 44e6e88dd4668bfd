"""The Sartorius cell types and the per-type defaults every module shares.

Defaults follow public solutions of the Sartorius cell-instance-segmentation competition
(order shsy5y, astro, cort): score thresholds about [0.15, 0.35, 0.55], minimum area [75, 150, 75] px.
"""

from __future__ import annotations

DEFAULT_CLASSES: tuple[str, ...] = ("shsy5y", "astro", "cort")

#: COCO category ids the competition's COCO conversions use (shsy5y=1, astro=2, cort=3).
DEFAULT_CATEGORY_IDS: dict[str, int] = {"shsy5y": 1, "astro": 2, "cort": 3}

SCORE_THRESHOLDS: dict[str, float] = {"shsy5y": 0.15, "astro": 0.35, "cort": 0.55}
MIN_AREAS: dict[str, int] = {"shsy5y": 75, "astro": 150, "cort": 75}

#: Used for class names outside the three Sartorius types.
FALLBACK_SCORE_THRESHOLD = 0.5
FALLBACK_MIN_AREA = 75


def check_cell_type(name: str | None, classes=DEFAULT_CLASSES) -> str | None:
    """Return ``name`` if it is None, ``"auto"`` (as None) or one of ``classes``; else raise ValueError."""
    if name is None or name == "auto":
        return None
    if name not in classes:
        raise ValueError(f"unknown cell type {name!r}: use one of {', '.join(classes)} (or auto)")
    return name

"""In-memory annotation sets: what every format (COCO JSON, Kaggle CSV, label images) reads into
and writes from, and what the metric and training consume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .cell_types import DEFAULT_CLASSES
from .instances import Instances

#: Extensions of image and label files (those ``AnnotationSet.key_for`` strips); the same as
#: ``io.images.IMAGE_EXTENSIONS`` (io imports this module, so the tuple lives here too).
FILE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

__all__ = ["ImageAnnotations", "AnnotationSet"]


@dataclass
class ImageAnnotations:
    """The instances of one image.

    Attributes:
        image_id: the image's key, its file stem (e.g. ``"0f7d009bc5d3"``); formats match on it.
        instances: the cells; ``instances.image_size`` is ``(height, width)``. Annotations have
            score 1 and 0/1 mask crops; predictions carry their scores and probabilities.
        cell_type: the image's cell type when known (one name of the set's ``class_names``).
        file_name: the image file's name as the source recorded it (COCO ``file_name``), if any.
    """

    image_id: str
    instances: Instances
    cell_type: str | None = None
    file_name: str | None = None

    @property
    def height(self) -> int:
        return self.instances.image_size[0]

    @property
    def width(self) -> int:
        return self.instances.image_size[1]


@dataclass
class AnnotationSet:
    """Annotations of several images with one list of class names.

    ``instances.classes`` index into ``class_names``. ``category_ids`` keeps the COCO category id of each
    class name so that a COCO round trip keeps the source's ids.
    """

    images: list[ImageAnnotations] = field(default_factory=list)
    class_names: tuple[str, ...] = DEFAULT_CLASSES
    category_ids: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        return iter(self.images)

    def by_id(self) -> dict[str, ImageAnnotations]:
        return {im.image_id: im for im in self.images}

    def get(self, image_id: str) -> ImageAnnotations | None:
        return self.by_id().get(image_id)

    @staticmethod
    def key_for(path_or_name: str | Path) -> str:
        """The matching key of an image or label file: its name without an image extension (one of
        ``FILE_SUFFIXES``) and without a ``_labels`` suffix. Any other dot belongs to the key:
        ``"img.v2"`` -> ``"img.v2"``, ``"img.v2.png"`` -> ``"img.v2"``, ``"a_labels.tif"`` -> ``"a"``."""
        p = Path(str(path_or_name))
        stem = p.stem if p.suffix.lower() in FILE_SUFFIXES else p.name
        return stem[: -len("_labels")] if stem.endswith("_labels") else stem

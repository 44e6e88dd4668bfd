"""Training data: images with their annotated cells, from memory (the viewer's layers), COCO JSON
(LIVECell's format) or the Kaggle CSV, as a ``torch.utils.data.Dataset`` for Mask R-CNN training.

An item is ``(image, target)``: ``image`` float32 ``(3, H, W)`` with values 0..255 (grayscale
replicated to 3 channels), ``target`` a dict with ``boxes`` float32 ``(N, 4)`` xyxy pixels,
``labels`` int64 ``(N,)`` = class index + 1 (0 is the background in torchvision's Mask R-CNN) and
``masks`` uint8 ``(N, H, W)``. Annotations are kept as :class:`~napari_sartorius.instances.Instances`
(mask crops); full-image masks are built per item, after the random crop, and only at training time.

Images without any cell are kept as negative examples; a dataset must hold at least one cell overall.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..annotations import AnnotationSet, ImageAnnotations
from ..cell_types import DEFAULT_CLASSES
from ..instances import Instances

__all__ = [
    "TrainSample",
    "TrainingDataset",
    "dataset_from_pairs",
    "dataset_from_annotations",
    "dataset_from_file",
    "concat_datasets",
    "collate",
]


@dataclass
class TrainSample:
    """One training image and its cells.

    Attributes:
        image_id: key of the image (file stem, or ``pair_<i>`` for in-memory pairs).
        instances: the cells; ``instances.image_size`` is the image's ``(H, W)``; ``classes`` index the
            dataset's ``class_names``.
        cell_type: the image's cell type (a class name) or None when unknown.
        image: the pixels, uint8 ``(H, W)`` (or ``(H, W, 3)``), when held in memory.
        path: the image file, read on demand with ``napari_sartorius.io.images.read_image``, otherwise.
    """

    image_id: str
    instances: Instances
    cell_type: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    path: Path | None = None

    @property
    def n_cells(self) -> int:
        return len(self.instances)

    def load_image(self) -> np.ndarray:
        """The image as uint8 ``(H, W)`` (or ``(H, W, 3)``); checks that it matches the annotations' size."""
        if self.image is not None:
            img = self.image
        elif self.path is not None:
            from ..io.images import read_image

            img = read_image(self.path)
        else:
            raise ValueError(f"training image {self.image_id!r} has neither pixels nor a file")
        if tuple(img.shape[:2]) != tuple(self.instances.image_size):
            where = f"file {self.path}" if self.path is not None else f"image {self.image_id!r}"
            raise ValueError(
                f"{where} is {img.shape[0]}x{img.shape[1]} (height x width) but its annotations are for "
                f"{self.instances.image_size[0]}x{self.instances.image_size[1]}: labels must match the image"
            )
        return img

    def annotations(self) -> ImageAnnotations:
        name = self.path.name if self.path is not None else None
        return ImageAnnotations(self.image_id, self.instances, self.cell_type, name)


class TrainingDataset(torch.utils.data.Dataset):
    """Annotated images for training and validation.

    Index with an int, or with ``(index, seed)`` to fix that item's random augmentation (what the
    trainer's sampler does, so a run is reproducible and resumable).

    Args:
        samples: the images.
        class_names: names of the classes the instances' ``classes`` index.
        transform: augmentation applied per item (``None``: none, image and masks as they are).
        sources: human-readable origin of the data (file paths, "2 image/labels pairs"), recorded in
            the trained checkpoint's provenance.
        require_cells: refuse a dataset without any cell (right for training; a validation set may
            hold only negative images).

    Raises:
        ValueError: no image, or no cell in any image, or a class index outside ``class_names``.
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        class_names: Sequence[str] = DEFAULT_CLASSES,
        transform: Callable | None = None,
        sources: Sequence[str] = (),
        *,
        require_cells: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.class_names = tuple(str(c) for c in class_names)
        self.transform = transform
        self.sources = tuple(sources)
        if not self.samples:
            raise ValueError("the training data holds no image")
        if not self.class_names:
            raise ValueError("the training data has no class names")
        if require_cells and sum(s.n_cells for s in self.samples) == 0:
            raise ValueError(
                f"none of the {len(self.samples)} training image(s) has any annotated cell: "
                "label some cells (images without cells are only used as negative examples)"
            )
        for s in self.samples:
            c = s.instances.classes
            if c.size and (c.min() < 0 or c.max() >= len(self.class_names)):
                raise ValueError(
                    f"image {s.image_id!r} has class index {int(c.max())} but only {len(self.class_names)} "
                    f"class names {self.class_names}"
                )
            if s.cell_type is not None and s.cell_type not in self.class_names:
                raise ValueError(
                    f"image {s.image_id!r} has cell type {s.cell_type!r}, not one of {', '.join(self.class_names)}"
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, None
        s = self.samples[int(index)]
        image = s.load_image()
        if self.transform is None:
            return _plain_item(image, s.instances)
        return self.transform(image, s.instances, seed=seed)

    # -- views ---------------------------------------------------------------------------------
    @property
    def cell_types(self) -> list[str | None]:
        """Each image's cell type: its own, else the majority class of its cells, else None."""
        out = []
        for s in self.samples:
            if s.cell_type is not None:
                out.append(s.cell_type)
            elif s.n_cells:
                out.append(self.class_names[int(np.bincount(s.instances.classes).argmax())])
            else:
                out.append(None)
        return out

    @property
    def n_cells(self) -> int:
        return sum(s.n_cells for s in self.samples)

    def with_transform(self, transform: Callable | None) -> TrainingDataset:
        """The same samples with another augmentation (no copy of the pixels)."""
        return TrainingDataset(self.samples, self.class_names, transform, self.sources)

    def subset(self, indices: Sequence[int], *, require_cells: bool = True) -> TrainingDataset:
        """The samples at ``indices`` (raises like the constructor when they hold no cell and
        ``require_cells``)."""
        return TrainingDataset(
            [self.samples[int(i)] for i in indices], self.class_names, self.transform, self.sources,
            require_cells=require_cells,
        )

    def annotation_set(self) -> AnnotationSet:
        """The ground truth as an :class:`AnnotationSet` (what the metric consumes)."""
        return AnnotationSet([s.annotations() for s in self.samples], self.class_names)

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for t in self.cell_types:
            counts[t or "unknown"] = counts.get(t or "unknown", 0) + 1
        kinds = ", ".join(f"{k}: {v}" for k, v in counts.items())
        return f"{len(self)} images ({kinds}), {self.n_cells} cells"


def _plain_item(image: np.ndarray, instances: Instances) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from .augment import instances_to_masks, masks_to_boxes, to_chw_tensor

    img = to_chw_tensor(image).float()
    masks = instances_to_masks(instances)
    keep = masks.flatten(1).sum(dim=1) > 0
    masks = masks[keep]
    labels = torch.from_numpy(instances.classes.copy())[keep] + 1
    return img, {"boxes": masks_to_boxes(masks), "labels": labels, "masks": masks}


def collate(batch):
    """DataLoader ``collate_fn``: a batch is ``(list of images, list of targets)``."""
    return [b[0] for b in batch], [b[1] for b in batch]


# -- constructors ------------------------------------------------------------------------------


def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(c) for c in class_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct and non-empty, got {names}")
    return names


def dataset_from_pairs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    cell_types: str | Sequence[str],
    *,
    class_names: Sequence[str] = DEFAULT_CLASSES,
    names: Sequence[str] | None = None,
    clean: bool = False,
    transform: Callable | None = None,
) -> TrainingDataset:
    """Training data from ``(image, labels)`` pairs held in memory (what the viewer has).

    Args:
        pairs: ``image`` uint8 ``(H, W)`` grayscale (or ``(H, W, 3)``; float 0..255 is rounded to uint8)
            and ``labels`` an integer ``(H, W)`` label image, 0 = background, one id per cell.
        cell_types: the cell type of every pair (one name for all, or one per pair); every cell of a
            pair gets that class.
        class_names: the classes the model will learn.
        names: an id per pair (e.g. the layer names); default ``pair_0``, ``pair_1``, ...
        clean: clean the masks first (fill holes, drop fragments, resolve overlaps).
        transform: the augmentation (see :class:`~.augment.TrainTransform`).

    Raises:
        ValueError: a labels array whose shape differs from its image's, an unknown cell type,
            no pair, or no cell in any pair (message names the pair).
    """
    class_names = _check_class_names(class_names)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no (image, labels) pair given: choose at least one image with its labels")
    types = [cell_types] * len(pairs) if isinstance(cell_types, str) else list(cell_types)
    if len(types) != len(pairs):
        raise ValueError(f"{len(types)} cell types for {len(pairs)} image/labels pairs")
    ids = [f"pair_{i}" for i in range(len(pairs))] if names is None else [str(n) for n in names]
    if len(ids) != len(pairs):
        raise ValueError(f"{len(ids)} names for {len(pairs)} image/labels pairs")
    samples = []
    for i, ((image, labels), ctype, name) in enumerate(zip(pairs, types, ids)):
        if ctype not in class_names:
            raise ValueError(f"pair {name!r}: unknown cell type {ctype!r}; use one of {', '.join(class_names)}")
        image = _as_uint8_image(image, name)
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"pair {name!r}: labels must be a 2-D (height, width) label image, got shape {labels.shape}")
        if labels.shape != image.shape[:2]:
            raise ValueError(
                f"pair {name!r}: labels are {labels.shape[0]}x{labels.shape[1]} but the image is "
                f"{image.shape[0]}x{image.shape[1]} (height x width): pick the labels drawn on this image"
            )
        inst = Instances.from_label_image(labels, classes=class_names.index(ctype))
        samples.append(TrainSample(name, inst, ctype, image=image))
    n = len(pairs)
    ds = TrainingDataset(samples, class_names, None, [f"{n} image/labels pair{'s' if n != 1 else ''} in memory"])
    if clean:
        ds = _cleaned(ds)
    return ds.with_transform(transform)


def _as_uint8_image(image, name: str) -> np.ndarray:
    a = np.asarray(image)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise ValueError(f"image {name!r}: expected (H, W) grayscale or (H, W, 3) RGB, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        if a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 255):
            raise ValueError(
                f"image {name!r} has values outside 0..255 ({a.dtype}); convert it to 8 bits first "
                "(napari_sartorius.io.images.to_uint8_gray)"
            )
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    raise ValueError(f"image {name!r} has unsupported dtype {a.dtype}")


def dataset_from_annotations(
    annotations: AnnotationSet,
    images: str | Path | Sequence[str | Path] | Sequence[np.ndarray] | None,
    *,
    clean: bool = False,
    transform: Callable | None = None,
    source: str | None = None,
) -> TrainingDataset:
    """Training data from an :class:`AnnotationSet` and its images.

    Args:
        annotations: the cells of each image (classes index ``annotations.class_names``).
        images: a folder holding the image files (found by ``file_name`` or ``image_id`` with
            ``napari_sartorius.io.images.find_image``; read lazily), a list of such folders (searched
            in order), or the images themselves in the order of ``annotations.images``.
        clean: clean the masks first.
        transform: the augmentation.
        source: what to record in the provenance (default: the folder, or "in memory").

    Raises:
        ValueError: an image that cannot be found (message names it and the folder), a count
            mismatch, sizes that differ, no cell anywhere.
    """
    ims = list(annotations.images)
    if not ims:
        raise ValueError("the annotation set holds no image")
    samples = []
    folder_list = isinstance(images, (list, tuple)) and bool(images) and all(
        isinstance(x, (str, os.PathLike)) for x in images
    )
    if images is None or isinstance(images, (str, os.PathLike)) or folder_list:
        from ..io.images import find_image

        if images is None:
            raise ValueError("the folder holding the annotated images is needed (images_dir)")
        folders = [Path(d) for d in images] if folder_list else [Path(images)]
        for folder in folders:
            if not folder.is_dir():
                raise ValueError(f"image folder {folder} does not exist")
        where = " or ".join(map(str, folders))
        for im in ims:
            path = None
            for key in (im.file_name, im.image_id):
                if key:
                    path = find_image(key, folders)
                    if path is not None:
                        break
            if path is None:
                raise ValueError(
                    f"image {im.file_name or im.image_id!r} of the annotations is not in {where}: "
                    "pass the folder that holds the images"
                )
            samples.append(TrainSample(im.image_id, im.instances, im.cell_type, path=path))
        src = source or where
    else:
        arrays = list(images)
        if len(arrays) != len(ims):
            raise ValueError(f"{len(arrays)} images for {len(ims)} annotated images")
        for im, arr in zip(ims, arrays):
            arr = _as_uint8_image(arr, im.image_id)
            if arr.shape[:2] != tuple(im.instances.image_size):
                raise ValueError(
                    f"image {im.image_id!r} is {arr.shape[0]}x{arr.shape[1]} but its annotations are for "
                    f"{im.instances.image_size[0]}x{im.instances.image_size[1]} (height x width)"
                )
            samples.append(TrainSample(im.image_id, im.instances, im.cell_type, image=arr))
        src = source or f"{len(ims)} annotated images in memory"
    ds = TrainingDataset(samples, annotations.class_names, None, [src])
    if clean:
        ds = _cleaned(ds)
    return ds.with_transform(transform)


def dataset_from_file(
    path: str | Path,
    images_dir: str | Path | Sequence[str | Path] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    cell_type: str | None = None,
    clean: bool = False,
    transform: Callable | None = None,
) -> TrainingDataset:
    """Training data from a COCO JSON (e.g. LIVECell) or a Kaggle ``train.csv`` and its image folder.

    Args:
        path: the annotation file (or a folder of label images); read with
            ``napari_sartorius.io.load_annotations``.
        images_dir: the images' folder, or several (searched in order); default the annotation file's
            folder or ``images/`` beside it.
        class_names: the known classes in index order (default shsy5y, astro, cort; a COCO file with
            other categories brings its own).
        cell_type: the cell type of every image where the source does not say.
        clean: clean the masks first.
        transform: the augmentation.

    Raises:
        ValueError: a missing file or folder, an image not found, malformed annotations.
    """
    from .. import io as ns_io
    from ..io.images import default_image_dirs

    path = Path(path)
    if not path.exists():
        raise ValueError(f"annotation file {path} does not exist")
    if isinstance(images_dir, (list, tuple)) and not images_dir:
        images_dir = None
    for d in [] if images_dir is None else [images_dir] if isinstance(images_dir, (str, os.PathLike)) else images_dir:
        if not Path(d).is_dir():
            raise ValueError(f"image folder {d} does not exist (annotations: {path})")
    aset = ns_io.load_annotations(path, images_dir, class_names, cell_type=cell_type)
    if images_dir is None:
        dirs = default_image_dirs(path)
        # the first candidate folder that holds the first image, else the first folder
        from ..io.images import find_image

        first = aset.images[0] if aset.images else None
        images_dir = next(
            (d for d in dirs if first is not None and find_image(first.file_name or first.image_id, [d])),
            dirs[0] if dirs else path.parent,
        )
    return dataset_from_annotations(aset, images_dir, clean=clean, transform=transform, source=str(path))


def concat_datasets(datasets: Sequence[TrainingDataset]) -> TrainingDataset:
    """Join datasets that share class names (e.g. several ``--data`` sources)."""
    datasets = list(datasets)
    if not datasets:
        raise ValueError("no training data given")
    names = datasets[0].class_names
    for d in datasets[1:]:
        if d.class_names != names:
            raise ValueError(f"training sources have different class names: {names} and {d.class_names}")
    samples = [s for d in datasets for s in d.samples]
    seen: dict[str, int] = {}
    for s in samples:
        seen[s.image_id] = seen.get(s.image_id, 0) + 1
    if any(v > 1 for v in seen.values()):
        dup = [k for k, v in seen.items() if v > 1][:3]
        raise ValueError(f"image ids occur in several training sources: {', '.join(dup)}")
    return TrainingDataset(samples, names, datasets[0].transform, [s for d in datasets for s in d.sources])


def _cleaned(ds: TrainingDataset) -> TrainingDataset:
    """Clean every sample's masks with ``napari_sartorius.cleaning.clean_annotations`` (fill holes, drop
    stray fragments, resolve overlaps); the summary goes into ``sources`` (the provenance)."""
    from ..cleaning import clean_annotations

    samples, report = [], None
    for s in ds.samples:
        inst, rep = clean_annotations(s.instances)
        report = rep if report is None else report + rep
        samples.append(TrainSample(s.image_id, inst, s.cell_type, s.image, s.path))
    note = (
        f"masks cleaned ({report.n_instances_in} -> {report.n_instances_out} cells, "
        f"{report.holes_filled} with holes filled, {report.fragments_dropped} fragments dropped)"
    )
    return TrainingDataset(samples, ds.class_names, ds.transform, [*ds.sources, note])

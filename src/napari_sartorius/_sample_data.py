"""Sample data for napari's File > Open Sample: one synthetic image per cell-type style with its
exact ground-truth labels (:mod:`napari_sartorius.synthetic`, seed 0, 520 x 704 pixels).

Each function returns napari layer-data tuples ``[(image uint8 (H, W), meta, "image"),
(labels uint16 (H, W), meta, "labels")]``. No torch is imported here.
"""

from __future__ import annotations

__all__ = ["make_shsy5y_sample", "make_astro_sample", "make_cort_sample", "sample_layers"]


def sample_layers(style: str, seed: int = 0, shape: tuple[int, int] = (520, 704)) -> list[tuple]:
    """The image and ground-truth labels of synthetic ``style`` (``"shsy5y"``, ``"astro"``, ``"cort"``)."""
    from .synthetic import make_sample

    s = make_sample(style, seed=seed, shape=shape)
    image_meta = {"name": f"{style} sample", "metadata": {"cell_type": s.cell_type, "synthetic_seed": seed}}
    labels_meta = {
        "name": f"{style} ground truth",
        "metadata": {"cell_type": s.cell_type, "synthetic_seed": seed},
        "opacity": 0.5,
    }
    return [(s.image, image_meta, "image"), (s.labels, labels_meta, "labels")]


def make_shsy5y_sample() -> list[tuple]:
    """Dense small SH-SY5Y-like cells with neurites (a few hundred per image)."""
    return sample_layers("shsy5y")


def make_astro_sample() -> list[tuple]:
    """Large irregular astrocyte-like cells."""
    return sample_layers("astro")


def make_cort_sample() -> list[tuple]:
    """Round, sparse cortical-neuron-like cells."""
    return sample_layers("cort")

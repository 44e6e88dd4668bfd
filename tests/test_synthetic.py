import numpy as np
import pytest

from napari_sartorius.annotations import AnnotationSet
from napari_sartorius.cell_types import DEFAULT_CLASSES
from napari_sartorius.instances import Instances
from napari_sartorius.synthetic import STYLES, SyntheticSample, make_dataset, make_sample

SMALL = (128, 160)


@pytest.mark.parametrize("style", STYLES)
def test_same_seed_same_sample_and_other_seed_differs(style):
    a = make_sample(style, seed=3, shape=SMALL)
    b = make_sample(style, seed=3, shape=SMALL)
    c = make_sample(style, seed=4, shape=SMALL)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("style", STYLES)
def test_shapes_dtypes_and_labels_without_gaps(style):
    s = make_sample(style, seed=0, shape=SMALL, n_cells=6)
    assert isinstance(s, SyntheticSample)
    assert s.image.shape == SMALL and s.image.dtype == np.uint8
    assert s.labels.shape == SMALL and s.labels.dtype == np.uint16
    assert s.cell_type == style
    ids = np.unique(s.labels)
    assert ids[0] == 0
    assert np.array_equal(ids[1:], np.arange(1, s.n_cells + 1))
    # A phase-contrast-like image: mid-gray background, cells differ from it.
    background = s.image[s.labels == 0]
    assert 110 < np.median(background) < 146
    assert s.image.std() > 3


def test_instances_match_labels():
    s = make_sample("shsy5y", seed=1, shape=SMALL, n_cells=15)
    inst = s.instances
    assert isinstance(inst, Instances)
    assert len(inst) == s.n_cells
    assert inst.image_size == SMALL
    assert np.all(inst.classes == DEFAULT_CLASSES.index("shsy5y"))
    assert np.all(inst.scores == 1)
    # Crops paint back to the same (non-overlapping) label image.
    assert np.array_equal(inst.to_label_image(), s.labels)
    total = sum(int(a) for a in inst.areas())
    assert total == np.count_nonzero(s.labels)
    ann = s.to_annotations("x")
    assert ann.image_id == "x" and ann.cell_type == "shsy5y" and ann.height == SMALL[0]


# Style ranges from the module docstring (areas in px, counts per 520 x 704 image).
RANGES = {"shsy5y": ((150, 300), (150, 300)), "astro": ((600, 1500), (40, 90)), "cort": ((150, 300), (20, 40))}


@pytest.mark.parametrize("style", ["astro", "cort"])
def test_full_size_counts_and_areas_in_style_range(style):
    (alo, ahi), (nlo, nhi) = RANGES[style]
    s = make_sample(style, seed=2)
    assert s.image.shape == (520, 704)
    areas = np.bincount(s.labels.ravel())[1:]
    assert 0.8 * nlo <= s.n_cells <= nhi
    assert areas.min() >= 0.8 * alo and areas.max() <= 1.1 * ahi
    assert alo <= np.median(areas) <= ahi


def test_shsy5y_dense_and_small():
    (alo, ahi), (nlo, nhi) = RANGES["shsy5y"]
    s = make_sample("shsy5y", seed=5, shape=(260, 352))  # a quarter of the reference area
    areas = np.bincount(s.labels.ravel())[1:]
    assert 0.8 * nlo / 4 <= s.n_cells <= nhi / 4 + 1
    assert alo <= np.median(areas) <= ahi
    # Clustered: a good share of cells touch another cell.
    from scipy import ndimage

    grown = ndimage.grey_dilation(s.labels, size=3)
    touching = np.unique(s.labels[(grown != s.labels) & (s.labels > 0) & (grown > 0)])
    assert touching.size >= 0.2 * s.n_cells


def test_n_cells_and_scale_are_honoured():
    s = make_sample("cort", seed=0, shape=(200, 200), n_cells=5)
    assert s.n_cells == 5
    big = make_sample("cort", seed=0, shape=(200, 200), n_cells=3, scale=2.0)
    assert np.median(np.bincount(big.labels.ravel())[1:]) >= 4 * 150
    assert make_sample("cort", seed=0, shape=SMALL, n_cells=0).n_cells == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="shsy5y, astro, cort"):
        make_sample("hela")
    with pytest.raises(ValueError, match="shape"):
        make_sample("cort", shape=(4, 4))
    with pytest.raises(ValueError, match="n_cells"):
        make_sample("cort", n_cells=-1)
    with pytest.raises(ValueError, match="shsy5y, astro, cort"):
        make_dataset(2, styles=("cort", "neuron"))


def test_make_dataset_ids_order_and_classes():
    images, annots = make_dataset(4, styles=("cort", "astro"), seed=7, shape=SMALL, n_cells=3)
    assert isinstance(annots, AnnotationSet)
    assert [a.image_id for a in annots] == [
        "synthetic_cort_000", "synthetic_astro_001", "synthetic_cort_002", "synthetic_astro_003",
    ]
    assert annots.class_names == DEFAULT_CLASSES
    for img, a in zip(images, annots):
        assert img.shape == SMALL and img.dtype == np.uint8
        assert a.instances.image_size == SMALL
        assert np.all(a.instances.classes == DEFAULT_CLASSES.index(a.cell_type))
    # Image i is make_sample(style_i, seed + i).
    assert np.array_equal(images[1], make_sample("astro", seed=8, shape=SMALL, n_cells=3).image)

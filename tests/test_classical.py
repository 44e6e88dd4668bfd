import dataclasses

import numpy as np
import pytest

from napari_sartorius.cell_types import DEFAULT_CLASSES, SCORE_THRESHOLDS
from napari_sartorius.classical import (
    SCORE_OPERATING_POINT,
    ClassicalEngine,
    ClassicalSettings,
    calibrate,
)
from napari_sartorius.instances import Instances
from napari_sartorius.metrics import competition_score, match_counts
from napari_sartorius.postprocess import PostprocessSettings, postprocess
from napari_sartorius.synthetic import make_sample

SMALL = (128, 160)


def _assert_valid(inst: Instances, shape) -> None:
    assert isinstance(inst, Instances)
    assert inst.image_size == tuple(shape)
    assert np.all((inst.scores >= 0) & (inst.scores <= 1))
    assert np.all((inst.classes >= 0) & (inst.classes < len(DEFAULT_CLASSES)))
    # Non-overlapping masks: painting them covers as many pixels as their areas add up to.
    assert np.count_nonzero(inst.to_label_image()) == int(inst.areas().sum())
    assert np.all(inst.areas() > 0)


def _kept(inst: Instances, cell_type: str) -> np.ndarray:
    """The default post-processing (per-type score threshold, minimum area) -> label image."""
    return postprocess(inst, PostprocessSettings(cell_type=cell_type)).labels


def test_engine_contract():
    eng = ClassicalEngine()
    assert eng.name == "classical"
    assert eng.class_names == DEFAULT_CLASSES
    images = [make_sample("cort", seed=s, shape=SMALL, n_cells=4).image for s in (0, 1)]
    out = eng.predict_batch(images)
    assert len(out) == 2
    for inst in out:
        _assert_valid(inst, SMALL)
    assert np.array_equal(out[0].to_label_image(), eng.predict(images[0]).to_label_image())


def test_finds_cells_on_synthetic_cort_and_keeps_few_false_positives():
    # Measured on these 6 small images (30 cells): 18 matched at IoU > 0.5 in the raw output; after the
    # default post-processing 10 kept, all 10 true cells (small images give lower scores than full ones).
    eng = ClassicalEngine(ClassicalSettings(cell_type="cort"))
    raw_tp = kept_tp = n_gt = n_kept = 0
    for seed in range(6):
        s = make_sample("cort", seed=seed, shape=SMALL, n_cells=5)
        inst = eng.predict(s.image)
        _assert_valid(inst, SMALL)
        assert np.all(inst.classes == DEFAULT_CLASSES.index("cort"))
        raw = match_counts(inst, s.labels)
        kept = match_counts(_kept(inst, "cort"), s.labels)
        raw_tp += int(raw.tp[0])
        kept_tp += int(kept.tp[0])
        n_gt += raw.n_gt
        n_kept += kept.n_pred
    assert raw_tp >= 0.45 * n_gt
    assert kept_tp >= 0.2 * n_gt
    assert kept_tp >= 0.8 * n_kept  # what survives post-processing is mostly cells


def test_scores_put_cells_above_and_junk_below_the_type_threshold():
    # A full-size cort image: many candidates (debris, neurite crossings) besides ~30 cells.
    s = make_sample("cort", seed=7)
    inst = ClassicalEngine(ClassicalSettings(cell_type="cort")).predict(s.image)
    labels = inst.to_label_image()
    truth = s.labels
    is_cell = np.zeros(len(inst), bool)
    for i in range(len(inst)):
        m = labels == i + 1
        ids, n = np.unique(truth[m], return_counts=True)
        best = max((c / (m.sum() + np.count_nonzero(truth == k) - c) for k, c in zip(ids, n) if k), default=0)
        is_cell[i] = best > 0.5
    assert is_cell.sum() >= 10 and (~is_cell).sum() >= 10
    thr = SCORE_THRESHOLDS["cort"]
    assert np.mean(inst.scores[is_cell] > thr) > 0.7
    assert np.mean(inst.scores[~is_cell] < thr) > 0.9
    # and post-processing keeps a picture that scores far above the raw output
    assert competition_score(_kept(inst, "cort"), truth) > competition_score(inst, truth) + 0.05


def test_calibration_maps_the_operating_point_onto_each_type_threshold():
    p = np.linspace(0.01, 0.99, 50)
    for cell_type, thr in SCORE_THRESHOLDS.items():
        out = calibrate(p, cell_type)
        assert out.dtype == np.float32
        assert np.all(np.diff(out) > 0)  # monotone: ranking unchanged
        assert calibrate(np.array([SCORE_OPERATING_POINT]), cell_type)[0] == pytest.approx(thr, abs=1e-5)
    assert calibrate(np.array([0.0, 1.0]), "cort").tolist() == pytest.approx([0.0, 1.0], abs=1e-4)


@pytest.mark.parametrize(
    "image",
    [np.zeros(SMALL, np.uint8), np.full(SMALL, 128, np.uint8), np.full(SMALL, 0.5, np.float32)],
    ids=["zeros", "flat", "flat-float"],
)
def test_flat_image_gives_no_instances(image):
    inst = ClassicalEngine().predict(image)
    assert len(inst) == 0 and inst.image_size == SMALL


def test_pure_noise_gives_nothing_after_postprocessing():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(128, 5, SMALL), 0, 255).astype(np.uint8)
    inst = ClassicalEngine(ClassicalSettings(cell_type="cort")).predict(img)
    assert int(_kept(inst, "cort").max()) <= 1


def test_rgb_and_16bit_input_match_gray():
    s = make_sample("cort", seed=3, shape=SMALL, n_cells=5)
    eng = ClassicalEngine(ClassicalSettings(cell_type="cort"))
    ref = eng.predict(s.image).to_label_image()
    assert ref.max() > 0
    rgb = np.repeat(s.image[..., None], 3, axis=2)
    assert np.array_equal(eng.predict(rgb).to_label_image(), ref)
    wide = s.image.astype(np.uint16) * 257  # the same picture stretched to 16 bits
    out16 = eng.predict(wide)
    _assert_valid(out16, SMALL)
    assert np.array_equal(out16.to_label_image(), ref)
    assert np.array_equal(eng.predict(s.image.astype(np.float64)).to_label_image(), ref)


def test_bad_input_and_settings():
    eng = ClassicalEngine()
    with pytest.raises(ValueError, match="shape"):
        eng.predict(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        eng.predict(np.full(SMALL, np.nan))
    with pytest.raises(ValueError, match="shsy5y, astro, cort"):
        ClassicalSettings(cell_type="hela")
    with pytest.raises(ValueError, match="cell_diameter"):
        ClassicalSettings(cell_diameter=1)
    with pytest.raises(ValueError, match="rays"):
        ClassicalSettings(rays=3)
    with pytest.raises(ValueError, match="ray_min"):
        ClassicalSettings(ray_min=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClassicalSettings().clip = 2.0  # type: ignore[misc]


def test_class_given_or_guessed():
    s = make_sample("cort", seed=0, shape=SMALL, n_cells=5)
    given = ClassicalEngine(ClassicalSettings(cell_type="shsy5y")).predict(s.image)
    assert len(given) and np.all(given.classes == DEFAULT_CLASSES.index("shsy5y"))
    auto = ClassicalEngine().predict(s.image)
    # One cell type per image; sparse small cells read as cort.
    assert len(auto) and np.all(auto.classes == DEFAULT_CLASSES.index("cort"))
    assert ClassicalEngine().guess_cell_type(s.image) == "cort"
    assert ClassicalSettings(cell_type="astro").diameter > ClassicalSettings(cell_type="cort").diameter
    assert ClassicalSettings(cell_diameter=25).diameter == 25

"""postprocess (batched cleaning, issue 11) against the per-instance implementation it replaced
(tests/postprocess_reference.py): identical label images, kept instances, areas and cell type."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_sartorius.instances import Instances
from napari_sartorius.postprocess import CleanedCrops, PostprocessSettings, postprocess
from postprocess_reference import reference_postprocess


def assert_matches_reference(x: Instances, s: PostprocessSettings, exclude=None, cache=None):
    res = postprocess(x, s, cache=cache, exclude=exclude)
    labels, kept, areas, ctype = reference_postprocess(x, s, exclude=exclude)
    assert res.labels.dtype == labels.dtype
    np.testing.assert_array_equal(res.labels, labels)
    np.testing.assert_array_equal(res.kept, kept)
    np.testing.assert_array_equal(res.features["area"], areas)
    assert res.cell_type == ctype
    return res


@st.composite
def random_instances(draw):
    h, w = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    n = draw(st.integers(0, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    masks, origins = [], []
    for _ in range(n):
        ch, cw = int(rng.integers(1, min(h, 14) + 1)), int(rng.integers(1, min(w, 14) + 1))
        if rng.random() < 0.5:  # a blob, sometimes hollow
            yy, xx = np.mgrid[0:ch, 0:cw]
            r = np.hypot((yy - (ch - 1) / 2) / max(ch / 2, 0.5), (xx - (cw - 1) / 2) / max(cw / 2, 0.5))
            m = np.clip(1.2 - r, 0, 1)
            if rng.random() < 0.3:
                m[r < 0.35] = 0.1
        else:  # speckle: many small pieces of equal size
            m = rng.choice([0.0, 0.3, 0.6, 1.0], size=(ch, cw))
        masks.append(m.astype(np.float32))
        origins.append((int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))))
    # few score levels: many ties, resolved by input order
    scores = rng.choice([0.1, 0.4, 0.6, 0.9], size=n).astype(np.float32)
    classes = rng.integers(0, 3, size=n)
    boxes = np.array([(x0, y0, x0 + m.shape[1], y0 + m.shape[0]) for m, (y0, x0) in zip(masks, origins)],
                     np.float32).reshape(n, 4)
    return Instances(image_size=(h, w), boxes=boxes, scores=scores, classes=classes, masks=masks,
                     mask_origins=np.asarray(origins, np.int64).reshape(n, 2))


_settings = st.builds(
    PostprocessSettings,
    mask_threshold=st.sampled_from([0.25, 0.5, 0.65, 1.0]),
    min_areas=st.tuples(*[st.sampled_from([0, 1, 5, 20])] * 3),
    score_thresholds=st.tuples(*[st.sampled_from([0.0, 0.3, 0.5])] * 3),
    max_overlap=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    fill_holes=st.booleans(),
    keep_largest=st.booleans(),
    cell_type=st.sampled_from([None, "shsy5y", "cort"]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=random_instances(), s=_settings, data=st.data())
def test_random_instances_match_the_reference(x, s, data):
    exclude = None
    if len(x) and data.draw(st.booleans()):
        exclude = np.asarray(data.draw(st.lists(st.booleans(), min_size=len(x), max_size=len(x))))
    assert_matches_reference(x, s, exclude=exclude)
    # the cache gives the same, also when its crops were cleaned for another candidate set first
    cache = CleanedCrops(x)
    postprocess(x, s.with_(score_thresholds=(0.5, 0.5, 0.5)), cache=cache)
    assert_matches_reference(x, s, exclude=exclude, cache=cache)


@pytest.mark.parametrize("n", [1000, 300])
def test_benchmark_instances_match_the_reference(n):
    from test_postprocess import _bench_module

    x = _bench_module().make_instances(n, seed=3)
    base = PostprocessSettings()
    for s in (base, base.with_(fill_holes=False), base.with_(keep_largest=False),
              base.with_(score_thresholds=(0.0, 0.0, 0.0), max_overlap=1.0)):
        res = assert_matches_reference(x, s)
        assert len(res) > n // 3


def _real_predictions(aset, seed: int) -> list[Instances]:
    """Prediction-like instances from each real image's annotated cells: soft-edged probability crops
    (a pixel's probability falls off outside the cell), each cell once more shifted by a few pixels with
    a lower score (the duplicates a model emits), a few hollowed; random scores, a random minority class."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = []
    for im in aset:
        gt = im.instances
        h, w = gt.image_size
        masks, origins, boxes, scores = [], [], [], []
        for i in range(len(gt)):
            crop = np.pad(gt.masks[i] >= 0.5, 2)
            prob = ndimage.gaussian_filter(crop.astype(np.float32), 1.0)
            if rng.random() < 0.15:
                prob[ndimage.binary_erosion(crop, iterations=3)] = 0.2
            y0, x0 = int(gt.mask_origins[i, 0]) - 2, int(gt.mask_origins[i, 1]) - 2
            score = float(rng.uniform(0.3, 1.0))
            for dy, dx, sc in ((0, 0, score), (*rng.integers(-3, 4, 2), score * 0.8)):
                yy, xx = max(y0 + int(dy), 0), max(x0 + int(dx), 0)
                p = prob[yy - (y0 + int(dy)):, xx - (x0 + int(dx)):][: h - yy, : w - xx]
                if p.size == 0:
                    continue
                masks.append(np.ascontiguousarray(p))
                origins.append((yy, xx))
                boxes.append((xx, yy, xx + p.shape[1], yy + p.shape[0]))
                scores.append(sc)
        n = len(masks)
        out.append(Instances(image_size=(h, w), boxes=np.asarray(boxes, np.float32).reshape(n, 4),
                             scores=np.asarray(scores, np.float32), classes=(rng.random(n) < 0.2).astype(np.int64) * 2,
                             masks=masks, mask_origins=np.asarray(origins, np.int64).reshape(n, 2)))
    return out


def test_real_images_predictions_match_the_reference(real_data):
    from napari_sartorius.io import coco

    aset = coco.read_coco(real_data / "coco.json")
    for x in _real_predictions(aset, seed=0):
        for s in (PostprocessSettings(), PostprocessSettings(cell_type="shsy5y", max_overlap=1.0),
                  PostprocessSettings(fill_holes=False, mask_threshold=0.3)):
            res = assert_matches_reference(x, s)
            assert len(res) > 10


def test_cleaned_crops_one_at_a_time_match_the_reference():
    from postprocess_reference import clean_crop
    from test_postprocess import _bench_module

    x = _bench_module().make_instances(40, seed=6)
    cache = CleanedCrops(x)
    for s in (PostprocessSettings(), PostprocessSettings(fill_holes=False, mask_threshold=0.3)):
        for i in (3, 0, 3, 39):
            np.testing.assert_array_equal(cache.get(i, s), clean_crop(x.masks[i], s))
        got = cache.get_many(np.arange(40), s)
        for i in range(40):
            np.testing.assert_array_equal(got[i], clean_crop(x.masks[i], s))

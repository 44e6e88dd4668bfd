"""Runs and COCO RLEs of many crops at once against the per-crop functions of io.rle."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_sartorius.io import rle
from napari_sartorius.io.rle_batch import coco_rles_batch, crop_runs_batch
from napari_sartorius.instances import Instances


@st.composite
def crops_in_image(draw):
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    n = draw(st.integers(0, 10))
    crops, origins = [], []
    for _ in range(n):
        ch, cw = draw(st.integers(0, h)), draw(st.integers(0, w))
        crops.append(draw(hnp.arrays(bool, (ch, cw))))
        origins.append((draw(st.integers(0, h - ch)), draw(st.integers(0, w - cw))))
    return crops, np.asarray(origins, np.int64).reshape(n, 2), (h, w)


def check(crops, origins, size):
    for order in ("F", "C"):
        runs = crop_runs_batch(crops, origins, size, order)
        for k, c in enumerate(crops):
            s, e = rle._crop_runs(c, origins[k], size, order)
            a, b = runs.offsets[k], runs.offsets[k + 1]
            np.testing.assert_array_equal(runs.starts[a:b], s)
            np.testing.assert_array_equal(runs.ends[a:b], e)
            assert runs.areas[k] == np.count_nonzero(c)
            if c.any():
                rows, cols = np.flatnonzero(c.any(1)), np.flatnonzero(c.any(0))
                y0, x0 = origins[k]
                assert runs.boxes[k].tolist() == [x0 + cols[0], y0 + rows[0], x0 + cols[-1], y0 + rows[-1]]
    rles, _ = coco_rles_batch(crops, origins, size)
    if crops:
        inst = Instances(image_size=size, boxes=np.zeros((len(crops), 4), np.float32),
                         scores=np.ones(len(crops), np.float32), classes=np.zeros(len(crops), np.int64),
                         masks=[c.astype(np.float32) if c.size else np.zeros((1, 1), np.float32) for c in crops],
                         mask_origins=origins) if all(c.size for c in crops) else None
        for k, c in enumerate(crops):
            want = rle._compress(rle._runs_to_coco_counts(*rle._crop_runs(c, origins[k], size, "F"), size[0] * size[1]),
                                 *size)
            assert rles[k] == want
            if inst is not None:
                assert rles[k] == rle.instance_to_coco_rle(inst, k)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crops_in_image())
def test_random_crops_match_the_per_crop_encoders(case):
    check(*case)


def test_full_height_and_full_width_crops_join_runs_across_lines():
    full = np.ones((6, 4), bool)  # a run per column that joins the next column's in F order
    partial = np.zeros((6, 3), bool)
    partial[:, 0] = True
    partial[4:, 1] = True
    partial[:2, 2] = True
    wide = np.ones((2, 9), bool)  # full image width: joins across rows in C order
    origins = np.array([[0, 1], [0, 5], [3, 0]])
    check([full, partial, wide], origins, (6, 9))
    runs = crop_runs_batch([full], origins[:1], (6, 9), "F")
    assert runs.starts.tolist() == [6] and runs.ends.tolist() == [30]


def _reference_records(inst, class_names, cat_ids, threshold):
    """io.coco._instance_records as it was before the batch (one instance at a time)."""
    from napari_sartorius.io.coco import _review_fields

    out = []
    for i in range(len(inst)):
        crop = inst.masks[i] >= threshold
        area = int(np.count_nonzero(crop))
        if area == 0:
            continue
        rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
        y0, x0 = (int(v) for v in inst.mask_origins[i])
        rec = {
            "category_id": int(cat_ids[class_names[int(inst.classes[i])]]),
            "segmentation": rle.instance_to_coco_rle(inst, i, threshold),
            "area": area,
            "bbox": [float(x0 + cols[0]), float(y0 + rows[0]), float(cols[-1] - cols[0] + 1),
                     float(rows[-1] - rows[0] + 1)],
            "score": float(inst.scores[i]),
        }
        rec.update(_review_fields(inst, i))
        out.append(rec)
    return out


def test_coco_records_match_the_per_instance_records(real_data):
    import json

    from napari_sartorius.annotations import AnnotationSet, ImageAnnotations
    from napari_sartorius.io import coco
    from test_postprocess import _bench_module

    x = _bench_module().make_instances(400, seed=5)
    x.columns = {"uncertainty": np.linspace(0, 1, len(x)).astype(np.float32), "reviewed": np.arange(len(x)) % 2 == 0}
    real = coco.read_coco(real_data / "coco.json")
    names = ("shsy5y", "astro", "cort")
    cat_ids = coco.category_ids_for(names, None)
    for inst in [x] + [im.instances for im in real]:
        for thr in (0.5, 0.9):
            aset = AnnotationSet([ImageAnnotations("a", inst, file_name="a.png")], class_names=names)
            got = coco.annotation_set_to_results(aset, {"a": 7}, threshold=thr)
            want = _reference_records(inst, names, cat_ids, thr)
            assert len(got) == len(want) > 0
            for g, w in zip(got, want):
                assert g.pop("image_id") == 7 and g.pop("file_name") == "a.png"
                assert json.dumps(g) == json.dumps(w)


def test_compressed_strings_match_pycocotools_for_large_and_negative_deltas():
    from napari_sartorius.io.rle_batch import _coco_strings

    rng = np.random.default_rng(0)
    # (sums below 2**31: pycocotools keeps the size in 32 bits)
    lists = [[int(v) for v in rng.integers(0, 10 ** int(rng.integers(1, 8)), size=int(rng.integers(1, 30)))]
             for _ in range(200)]
    lists += [[5], [0, 3], [0, 1, 2], [2 ** 28, 1, 7, 2 ** 27]]
    flat = np.array([v for c in lists for v in c], np.int64)
    bounds = np.concatenate([[0], np.cumsum([len(c) for c in lists])])
    got = _coco_strings(flat, bounds)
    for c, g in zip(lists, got):
        n = sum(c)
        assert {"size": [1, n], "counts": g} == rle._compress(c, 1, n)

"""WBF's compiled clustering loop (inference/fusion_kernels.py) against the Python loop it replaces, and
fusion without numba."""

import sys

import numpy as np
import pytest

from napari_sartorius.inference.crop_table import CropTable
from napari_sartorius.inference.ensemble import fuse_instances
from napari_sartorius.inference.fusion_methods import _cluster_wbf_grid, _grid, cluster_mask_nms
from napari_sartorius.instances import Instances

pytest.importorskip("numba")


def visiting_order(b, key):
    order = np.argsort(-key, kind="stable")
    return b[order], key[order]


def cell_boxes(rng, n, n_cells=60, extent=300.0):
    """Boxes jittered around ``n_cells`` cells (clusters of many members), with identical boxes and tied keys."""
    centres = rng.uniform(0, extent, (n_cells, 2))[rng.integers(0, n_cells, n)]
    half = rng.uniform(2, 15, (n, 2))
    b = np.concatenate([centres - half, centres + half], 1) + rng.normal(0, 1.5, (n, 4))
    b = np.concatenate([np.minimum(b[:, :2], b[:, 2:] - 0.5), b[:, 2:]], 1)
    b[50:60] = b[40:50]
    key = rng.random(n)
    key[100:120] = 0.5
    return visiting_order(b, key)


@pytest.mark.parametrize("iou_thr", [0.0, 0.3, 0.55, 0.8, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_loop_equals_the_python_loop_exactly(iou_thr, seed):
    b, key = cell_boxes(np.random.default_rng(seed), 500)
    got = _cluster_wbf_grid(b, key, iou_thr, compiled=True)
    want = _cluster_wbf_grid(b, key, iou_thr, compiled=False)
    assert len(want[3]) < len(b) or iou_thr == 1.0  # clusters formed: the update path ran
    for g, w, name in zip(got, want, ("assign", "fused boxes", "conf", "reps")):
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def test_compiled_loop_with_boxes_spanning_many_buckets():
    """Boxes ~50x the median side register their clusters in over a thousand buckets each: more bucket
    entries than the loop first allocates (it must grow them), and hulls that grow as members join."""
    rng = np.random.default_rng(3)
    small = rng.uniform(0, 600, (400, 2))
    small = np.concatenate([small, small + rng.uniform(2, 6, (400, 2))], 1)
    big = rng.uniform(0, 300, (20, 2))
    big = np.concatenate([big, big + rng.uniform(250, 300, (20, 2))], 1)
    b = np.concatenate([small, big, big + rng.normal(0, 20, (20, 4))])  # the last 20 move the big clusters
    key = np.concatenate([rng.random(420), rng.random(20) * 0.01])
    b, key = visiting_order(b, key)
    got = _cluster_wbf_grid(b, key, 0.3, compiled=True)
    want = _cluster_wbf_grid(b, key, 0.3, compiled=False)
    _, reg, _, _, _ = _grid(b)
    spans = (reg[:, 2] - reg[:, 0] + 1) * (reg[:, 3] - reg[:, 1] + 1)
    assert spans[want[3]].sum() > 4 * len(b)  # the clusters' first buckets alone: the loop starts with 4 per input
    assert np.any(np.bincount(want[0])[want[0][-20:]] > 1)  # some late members joined big clusters
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_single_box_and_all_identical_boxes():
    one = np.array([[1.0, 2.0, 5.0, 9.0]])
    assign, fused, conf, reps = _cluster_wbf_grid(one, np.array([0.7]), 0.5, compiled=True)
    assert assign.tolist() == [0] and reps.tolist() == [0]
    np.testing.assert_array_equal(fused, one)
    np.testing.assert_array_equal(conf, [0.7])
    same = np.repeat(one, 5, axis=0)
    assign, fused, conf, reps = _cluster_wbf_grid(same, np.full(5, 0.5), 0.5, compiled=True)
    assert assign.tolist() == [0] * 5 and reps.tolist() == [0]
    np.testing.assert_allclose(fused, one)
    np.testing.assert_allclose(conf, [2.5])


def sources(seed=0, n_sources=4, n=80, size=(120, 160)):
    rng = np.random.default_rng(seed)
    cells = rng.uniform([10, 10], [size[1] - 20, size[0] - 20], (30, 2))
    out = []
    for _ in range(n_sources):
        of = rng.integers(0, len(cells), n)
        x0y0 = cells[of] + rng.normal(0, 1.0, (n, 2))
        wh = rng.uniform(6, 12, (n, 2))
        boxes = np.concatenate([x0y0, x0y0 + wh], 1).astype(np.float32)
        masks = [rng.random((int(np.ceil(h)), int(np.ceil(w)))).astype(np.float32) for w, h in wh]
        origins = np.floor(x0y0[:, ::-1]).astype(np.int64)
        out.append(Instances(size, boxes, rng.random(n).astype(np.float32), np.zeros(n, np.int64), masks, origins))
    return out


def crop_table_and_bits(rng, n, size=(80, 100), max_side=14):
    """n random 0/1 crops (some empty, some full, many overlapping; the last 30 copies of the first 30):
    their CropTable, its pixels binarised, the crops' areas and windows (xyxy)."""
    masks, origins = [], []
    for k in range(n - 30):
        h, w = rng.integers(1, max_side, 2)
        fill = (0.0, 1.0, rng.uniform(0.2, 0.9))[k % 3]
        masks.append((rng.random((h, w)) < fill).astype(np.float32))
        origins.append((int(rng.integers(0, size[0] - h + 1)), int(rng.integers(0, size[1] - w + 1))))
    masks += [m.copy() for m in masks[:30]]
    origins += origins[:30]
    t = CropTable.from_crops(masks, origins)
    areas = np.array([int(m.sum()) for m in masks], np.int64)
    windows = np.stack([t.ox, t.oy, t.ox + t.ws, t.oy + t.hs], 1).astype(np.float64)
    return t, t.flat >= np.float32(0.5), areas, windows


@pytest.mark.parametrize("iou_thr", [0.0, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_mask_nms_equals_the_python_loop(iou_thr, seed):
    rng = np.random.default_rng(seed)
    table, bits, areas, windows = crop_table_and_bits(rng, 300)
    idx = np.concatenate([rng.permutation(270)[:220], np.arange(270, 300)])  # a subset (one class's), copies last
    key = np.sort(rng.random(250))[::-1]
    got = cluster_mask_nms(idx, table, bits, areas, windows[idx], key, iou_thr, compiled=True)
    want = cluster_mask_nms(idx, table, bits, areas, windows[idx], key, iou_thr, compiled=False)
    assert 0 < len(want[1]) < 250
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_mask_nms_keeps_a_disjoint_crop_and_suppresses_a_copy():
    masks = [np.ones((4, 4), np.float32), np.ones((4, 4), np.float32), np.ones((4, 4), np.float32)]
    t = CropTable.from_crops(masks, [(0, 0), (0, 0), (10, 10)])
    windows = np.stack([t.ox, t.oy, t.ox + t.ws, t.oy + t.hs], 1).astype(np.float64)
    bits = t.flat >= np.float32(0.5)
    assign, kept = cluster_mask_nms(np.arange(3), t, bits, np.full(3, 16), windows, np.array([0.9, 0.8, 0.7]), 0.5)
    assert kept.tolist() == [0, 2] and assign.tolist() == [0, 0, 1]


@pytest.mark.parametrize("method", ["wbf", "mask_nms"])
def test_fusion_without_numba_gives_the_same_instances(method, monkeypatch):
    """Where numba cannot be imported, fusion falls back to the Python loops: the same fused instances."""
    srcs = sources(n=600)  # 2400 candidates: enough for the compiled loops (COMPILE_FROM)
    with_numba = fuse_instances(srcs, method=method)
    assert "napari_sartorius.inference.fusion_kernels" in sys.modules
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "napari_sartorius.inference.fusion_kernels", raising=False)
    without = fuse_instances(srcs, method=method)
    assert "napari_sartorius.inference.fusion_kernels" not in sys.modules
    assert len(with_numba) == len(without) > 0
    np.testing.assert_array_equal(with_numba.boxes, without.boxes)
    np.testing.assert_array_equal(with_numba.scores, without.scores)
    for a, b in zip(with_numba.masks, without.masks):
        np.testing.assert_array_equal(a, b)
    for name in with_numba.columns:
        np.testing.assert_array_equal(with_numba.columns[name], without.columns[name])


def test_small_fusions_do_not_load_numba(monkeypatch):
    """numba's import costs ~0.5 s per process: a fusion of fewer than COMPILE_FROM candidates per class
    runs the Python loops unless the compiled ones are already loaded; a large one loads them."""
    monkeypatch.delitem(sys.modules, "napari_sartorius.inference.fusion_kernels", raising=False)
    small = fuse_instances(sources(n=100), method="wbf")  # 400 candidates
    assert len(small) > 0
    assert "napari_sartorius.inference.fusion_kernels" not in sys.modules
    fuse_instances(sources(n=600), method="wbf")
    assert "napari_sartorius.inference.fusion_kernels" in sys.modules

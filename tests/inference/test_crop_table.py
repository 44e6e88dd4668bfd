"""The vectorised crop operations of fusion (inference/crop_table.py) against the per-crop loops they
replaced (tests/inference/fusion_reference.py), on random crops."""

import numpy as np
import pytest

from napari_sartorius.inference.crop_table import (
    CropTable,
    average_groups,
    count_intersections,
    pair_chunks,
)
from napari_sartorius.inference.ensemble import METHODS, fuse_instances
from napari_sartorius.inference.uncertainty import ClusterAgreement
from napari_sartorius.instances import Instances

from fusion_reference import ReferenceClusterAgreement, reference_average_masks

SIZE = (60, 80)


def random_crops(rng, n, size=SIZE, max_side=12):
    masks, origins = [], []
    for _ in range(n):
        h, w = rng.integers(1, max_side, 2)
        masks.append(rng.random((h, w)).astype(np.float32))
        origins.append((int(rng.integers(0, size[0] - h + 1)), int(rng.integers(0, size[1] - w + 1))))
    return masks, np.asarray(origins, np.int64)


def random_groups(rng, n, n_groups):
    rows = rng.permutation(n)[: int(rng.integers(n_groups, n + 1))]
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), n_groups - 1, replace=False))
    return rows, np.concatenate([[0], cuts, [len(rows)]])


@pytest.mark.parametrize("budget", [1, 50, 1 << 18])
def test_group_means_equal_the_per_group_loop_bit_for_bit(budget):
    rng = np.random.default_rng(0)
    masks, origins = random_crops(rng, 60)
    rows, bounds = random_groups(rng, 60, 9)
    weights = rng.uniform(0.05, 2.0, len(rows))
    weights[bounds[2] : bounds[3]] = 0.0  # a group whose weights sum to 0 stays unscaled
    means = average_groups(masks, origins, rows, bounds, weights, 0.5, budget=budget)
    origin_list = [tuple(o) for o in origins.tolist()]
    for g in range(len(bounds) - 1):
        members = rows[bounds[g] : bounds[g + 1]].tolist()
        want, (y0, x0) = reference_average_masks(members, weights[bounds[g] : bounds[g + 1]].tolist(), masks, origin_list)
        got = means.crop(g)
        if len(members) > 1:
            assert tuple(means.windows[g, :2]) == (y0, x0)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
        # the pixel counts the uncertainty needs
        fused = got >= 0.5
        assert means.group_area[g] == np.count_nonzero(fused)
        for k, m in enumerate(members):
            mb = masks[m] >= 0.5
            assert means.member_area[bounds[g] + k] == np.count_nonzero(mb)
            full_m = np.zeros(SIZE, bool)
            full_m[origins[m, 0] : origins[m, 0] + mb.shape[0], origins[m, 1] : origins[m, 1] + mb.shape[1]] = mb
            wy, wx, h, w = means.windows[g]
            assert means.inter[bounds[g] + k] == np.count_nonzero(full_m[wy : wy + h, wx : wx + w] & fused)


def test_pair_chunks_cover_every_pair_once_within_the_budget():
    pixels = np.array([5, 1, 7, 30, 2, 2, 2])
    chunks = pair_chunks(pixels, 8)
    assert [i for lo, hi in chunks for i in range(lo, hi)] == list(range(len(pixels)))
    for lo, hi in chunks:
        assert pixels[lo:hi].sum() <= 8 or hi - lo == 1


def test_intersections_of_crops_anywhere_against_windows_anywhere():
    rng = np.random.default_rng(1)
    masks, origins = random_crops(rng, 40)
    targets, t_origins = random_crops(rng, 10, max_side=20)
    table, fused = CropTable.from_crops(masks, origins), CropTable.from_crops(targets, t_origins)
    members, tgt = rng.integers(0, 40, 120), rng.integers(0, 10, 120)
    windows = np.stack([fused.oy, fused.ox, fused.hs, fused.ws], axis=1)
    got = count_intersections(table.flat >= 0.5, table, members, fused.flat >= 0.5, fused.starts, windows, tgt)
    for p, (m, t) in enumerate(zip(members, tgt)):
        a, b = np.zeros(SIZE, bool), np.zeros(SIZE, bool)
        a[origins[m, 0] : origins[m, 0] + masks[m].shape[0], origins[m, 1] : origins[m, 1] + masks[m].shape[1]] = masks[m] >= 0.5
        b[t_origins[t, 0] : t_origins[t, 0] + targets[t].shape[0], t_origins[t, 1] : t_origins[t, 1] + targets[t].shape[1]] = targets[t] >= 0.5
        assert got[p] == np.count_nonzero(a & b)


def test_cluster_agreement_equals_the_per_member_loop():
    rng = np.random.default_rng(2)
    masks, origins = random_crops(rng, 80)
    origin_list = [tuple(o) for o in origins.tolist()]
    src, scores, w = rng.integers(0, 4, 80), rng.random(80), np.array([1.0, 2.0, 0.5, 1.0])
    new, old = (cls(masks, origin_list, src, scores, w, 0.5) for cls in (ClusterAgreement, ReferenceClusterAgreement))
    fused_masks, fused_origins = random_crops(rng, 25, max_side=16)
    for k in range(25):
        members = rng.choice(80, int(rng.integers(1, 6)), replace=False).tolist()
        crop, origin = fused_masks[k], tuple(fused_origins[k])
        if k % 5 == 0:  # a singleton cluster whose mask is its member's crop
            members, crop, origin = members[:1], masks[members[0]], origin_list[members[0]]
        new.add(crop, origin, members)
        old.add(crop, origin, members)
    order = rng.permutation(25)
    got, want = new.columns(order), old.columns(order)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def canned_sources(rng, n_sources=6, n_cells=25):
    """Sources that see the same cells with jittered boxes, random masks and scores."""
    cy, cx = rng.uniform(8, SIZE[0] - 8, n_cells), rng.uniform(8, SIZE[1] - 8, n_cells)
    out = []
    for _ in range(n_sources):
        keep = rng.random(n_cells) < 0.85
        boxes, masks, origins = [], [], []
        for y, x in zip(cy[keep], cx[keep]):
            x0, y0 = x - 5 + rng.normal(0, 0.8), y - 5 + rng.normal(0, 0.8)
            x1, y1 = x + 5 + rng.normal(0, 0.8), y + 5 + rng.normal(0, 0.8)
            oy, ox = max(int(np.floor(y0)) - 1, 0), max(int(np.floor(x0)) - 1, 0)
            h, w = min(int(np.ceil(y1)) + 1, SIZE[0]) - oy, min(int(np.ceil(x1)) + 1, SIZE[1]) - ox
            boxes.append((x0, y0, x1, y1))
            masks.append(rng.random((h, w)).astype(np.float32))
            origins.append((oy, ox))
        n = len(boxes)
        out.append(Instances(SIZE, boxes, rng.uniform(0.1, 1, n), rng.integers(0, 2, n), masks, origins))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_fusion_with_uncertainty_equals_the_per_cluster_loops(method, monkeypatch):
    """fuse_instances with the vectorised averaging and agreement against the same fusion with the
    reference per-cluster averaging and per-member agreement patched in."""
    import napari_sartorius.inference.ensemble as ens

    rng = np.random.default_rng(3)
    sources = canned_sources(rng)
    weights = rng.uniform(0.5, 2, len(sources))
    got = fuse_instances(sources, weights, method)

    def slow_average(c, member_rows, member_w, bounds, threshold):
        crops, origins = [], []
        for k in range(len(bounds) - 1):
            crop, origin = reference_average_masks(
                member_rows[bounds[k] : bounds[k + 1]].tolist(), member_w[bounds[k] : bounds[k + 1]].tolist(),
                c.masks, c.origins,
            )
            crops.append(crop)
            origins.append(origin)
        return crops, origins, None

    def slow_assemble(c, cls, r, result, average_masks, agreement, out):
        assign, fb, fs, reps, support = result
        pos, bounds = ens._groups(assign, len(reps))
        if support is not assign:
            cl, ps = support
            o = np.argsort(cl, kind="stable")
            support_rows = r[ps[o]].tolist()
            sbounds = np.searchsorted(cl[o], np.arange(len(reps) + 1)).tolist()
        else:
            support_rows, sbounds = r[pos].tolist(), bounds
        crops, origins, _ = slow_average(c, r[pos], (c.scores[r] * c.wt[r])[pos], np.asarray(bounds), None)
        out["masks"].extend(crops)
        out["origins"].extend(origins)
        for k, (crop, origin) in enumerate(zip(crops, origins)):
            agreement.add(crop, origin, support_rows[sbounds[k] : sbounds[k + 1]])
        out["boxes"].append(fb)
        out["scores"].append(fs)
        out["classes"].append(np.full(len(reps), cls, np.int64))

    monkeypatch.setattr(ens, "_assemble", slow_assemble)
    monkeypatch.setattr(ens, "ClusterAgreement", ReferenceClusterAgreement)
    want = fuse_instances(sources, weights, method)
    assert len(got) == len(want) > 0
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.classes, want.classes)
    np.testing.assert_array_equal(got.mask_origins, want.mask_origins)
    for a, b in zip(got.masks, want.masks):
        np.testing.assert_array_equal(a, b)
    assert set(got.columns) == set(want.columns) == {"uncertainty", "found", "mask_iou", "score_spread"}
    for name in want.columns:
        np.testing.assert_array_equal(got.columns[name], want.columns[name], err_msg=name)


@pytest.mark.parametrize("iou_thr", [0.0, 0.3, 0.55, 0.8, -0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_wbf_clustering_on_a_grid_equals_the_dense_loop(iou_thr, seed):
    from fusion_reference import reference_cluster_wbf

    from napari_sartorius.inference.fusion_methods import cluster_wbf

    rng = np.random.default_rng(seed)
    n = 400
    centres = rng.uniform(0, 300, (60, 2))[rng.integers(0, 60, n)]
    half = rng.uniform(2, 15, (n, 2))
    b = np.concatenate([centres - half, centres + half], 1) + rng.normal(0, 1.5, (n, 4))
    b = np.concatenate([np.minimum(b[:, :2], b[:, 2:] - 0.5), b[:, 2:]], 1)
    b[50:60] = b[40:50]  # identical boxes
    key = rng.random(n)
    key[100:120] = 0.5  # tied keys
    b = b[np.argsort(-key, kind="stable")]
    key = key[np.argsort(-key, kind="stable")]
    src = rng.integers(0, 4, n)
    weights = np.array([1.0, 2.0, 1.0, 0.5])
    w = weights[src]
    for conf_type in ("avg", "max", "box_and_model_avg"):
        got = cluster_wbf(b, key, w, src, iou_thr, conf_type, weights, False)
        want = reference_cluster_wbf(b, key, w, src, iou_thr, conf_type, weights, False)
        for g, r in zip(got, want):
            np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("method", ["wbf", "nms", "soft_nms"])
def test_uncertainty_of_unaveraged_clusters_equals_the_per_member_loop(method, monkeypatch):
    """average_masks=False (each cell keeps its top member's crop): the cells are counted one by one
    (ClusterAgreement.add), against the reference agreement."""
    import napari_sartorius.inference.ensemble as ens

    rng = np.random.default_rng(5)
    sources = canned_sources(rng)
    got = fuse_instances(sources, method=method, average_masks=False)
    monkeypatch.setattr(ens, "ClusterAgreement", ReferenceClusterAgreement)
    want = fuse_instances(sources, method=method, average_masks=False)
    assert len(got) == len(want) > 0
    for name in want.columns:
        np.testing.assert_array_equal(got.columns[name], want.columns[name], err_msg=name)


def test_empty_and_single_candidate_fusions_keep_their_columns():
    empty = Instances(SIZE)
    fused = fuse_instances([empty, empty])
    assert len(fused) == 0 and set(fused.columns) == {"uncertainty", "found", "mask_iou", "score_spread"}
    one = Instances(SIZE, [[2, 2, 9, 9]], [0.8], [0], [np.full((9, 9), 0.9, np.float32)], [[1, 1]])
    fused = fuse_instances([one, empty])
    assert len(fused) == 1 and fused.masks[0] is one.masks[0]
    assert fused.columns["found"][0] == pytest.approx(0.5) and fused.columns["mask_iou"][0] == pytest.approx(1.0)

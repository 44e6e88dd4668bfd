import numpy as np
import pytest

from napari_sartorius.instances import Instances
from napari_sartorius.inference.tta import (
    TTA_MODES,
    TTATransform,
    apply_transform,
    invert_instances,
    run_tta,
    tta_batches,
    tta_transforms,
)


def test_modes_have_the_documented_variants():
    assert [len(tta_transforms(m)) for m in TTA_MODES] == [1, 4, 8, 3]
    assert [t.name for t in tta_transforms("flips")] == ["identity", "hflip", "vflip", "hvflip"]
    d4 = tta_transforms("flips+rot90")
    assert len({(t.flip, t.k) for t in d4}) == 8
    assert [t.scale for t in tta_transforms("multiscale", scales=(0.5, 2))] == [0.5, 2.0]
    with pytest.raises(ValueError, match="unknown TTA mode"):
        tta_transforms("rot45")


def test_forward_transforms_are_the_usual_array_flips():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    h, v, hv = tta_transforms("flips")[1:]
    np.testing.assert_array_equal(apply_transform(img, h), img[:, ::-1])
    np.testing.assert_array_equal(apply_transform(img, v), img[::-1])
    np.testing.assert_array_equal(apply_transform(img, hv), img[::-1, ::-1])
    np.testing.assert_array_equal(apply_transform(img, TTATransform(k=1)), np.rot90(img))
    rgb = np.stack([img, img + 1, img + 2], axis=2)
    out = apply_transform(rgb, TTATransform(flip=True, k=3))
    assert out.shape == (4, 3, 3)
    np.testing.assert_array_equal(out[..., 1], np.rot90(img[:, ::-1] + 1, 3))


@pytest.mark.parametrize("t", tta_transforms("flips+rot90"), ids=lambda t: t.name)
def test_inverse_maps_a_transformed_mask_back_pixel_exactly(t):
    # an asymmetric L-shaped mask with non-binary values near a corner of a non-square image
    h, w = 9, 14
    full = np.zeros((h, w), np.float32)
    full[1:5, 2] = [0.6, 0.7, 0.8, 0.9]
    full[4, 2:6] = [0.9, 0.5, 0.4, 0.3]
    inst = Instances.from_full_masks([full], scores=[0.7], classes=[1])
    moved_full = apply_transform(full, t)
    moved = Instances.from_full_masks([moved_full], scores=[0.7], classes=[1])
    back = invert_instances(moved, t, (h, w))
    assert back.image_size == (h, w)
    np.testing.assert_array_equal(back.boxes, inst.boxes)
    np.testing.assert_array_equal(back.mask_origins, inst.mask_origins)
    np.testing.assert_array_equal(back.masks[0], inst.masks[0])


@pytest.mark.parametrize("mode", ["flips", "flips+rot90"])
@pytest.mark.parametrize("shape", [(64, 64), (72, 100)])
def test_equivariant_engine_gives_identical_results_for_every_variant(fakes, mode, shape):
    engine = fakes.BlobEngine(big_area=120)
    img = fakes.blob_image(shape, n=9, seed=3)
    reference = engine.predict_one(img)
    assert len(reference) == 9 and set(reference.classes.tolist()) == {0, 1}
    results = run_tta(engine, img, mode)
    assert len(results) == len(tta_transforms(mode))
    for r in results:
        fakes.assert_same_instances(r, reference)


def test_variants_of_equal_shape_share_one_batch(fakes):
    engine = fakes.BlobEngine()
    run_tta(engine, fakes.blob_image((64, 64), n=3), "flips+rot90")
    assert engine.batch_sizes == [8]
    engine = fakes.BlobEngine()
    run_tta(engine, fakes.blob_image((60, 80), n=3), "flips+rot90")
    assert engine.batch_sizes == [4, 4]
    assert sorted(set(engine.shapes)) == [(60, 80), (80, 60)]
    engine = fakes.BlobEngine()
    run_tta(engine, fakes.blob_image((60, 80), n=3), "flips")
    assert engine.batch_sizes == [4]
    batches = tta_batches(fakes.blob_image((60, 80), n=3), "multiscale")
    assert [b.images[0].shape for b in batches] == [(48, 64), (60, 80), (75, 100)]


def test_multiscale_maps_boxes_and_masks_back(fakes):
    engine = fakes.BlobEngine(big_area=10_000)
    img = fakes.blob_image((80, 120), n=8, radius=(6, 10), seed=5)
    reference = engine.predict_one(img)
    results = run_tta(engine, img, "multiscale")
    for t, r in zip(tta_transforms("multiscale"), results):
        assert r.image_size == (80, 120)
        assert len(r) == len(reference)
        # pair each instance with the reference instance of nearest box centre
        c_ref = (reference.boxes[:, :2] + reference.boxes[:, 2:]) / 2
        for i in range(len(r)):
            c = (r.boxes[i, :2] + r.boxes[i, 2:]) / 2
            j = int(np.argmin(((c_ref - c) ** 2).sum(1)))
            assert np.abs(r.boxes[i] - reference.boxes[j]).max() <= 1.5, t.name
            a, b = r.full_mask(i, 0.3), reference.full_mask(j, 0.3)
            iou = (a & b).sum() / (a | b).sum()
            assert iou > 0.8, (t.name, iou)
            assert 0.0 <= r.masks[i].min() and r.masks[i].max() <= 1.0
        if t.scale == 1.0:
            fakes.assert_same_instances(r, reference)


def test_rgb_images_and_bad_input(fakes):
    engine = fakes.BlobEngine()
    gray = fakes.blob_image((40, 50), n=3)
    rgb = np.stack([gray] * 3, axis=2)
    res = run_tta(engine, rgb, "flips")
    fakes.assert_same_instances(res[2], engine.predict_one(gray))
    with pytest.raises(ValueError, match="height, width"):
        run_tta(engine, np.zeros((2, 3, 4, 5)), "none")
    with pytest.raises(ValueError, match="height, width"):
        run_tta(engine, np.zeros((8, 8, 4)), "none")

    class Wrong:
        name = "wrong"

        def predict_batch(self, images):
            return [Instances.empty((5, 5)) for _ in images]

    with pytest.raises(ValueError, match="wrong.*image size"):
        run_tta(Wrong(), gray, "none")


def test_inverse_rejects_predictions_of_the_wrong_size():
    with pytest.raises(ValueError, match="image size"):
        invert_instances(Instances.empty((10, 20)), TTATransform(k=1), (10, 20))


class _SizedEngine:
    """A BlobEngine that, like Mask R-CNN, resizes its inputs to a test size it lets callers change."""

    def __init__(self, inner):
        from types import SimpleNamespace

        self.inner, self.name, self.class_names = inner, "sized", inner.class_names
        self.config = SimpleNamespace(min_size_test=800, max_size_test=1333)
        self.seen = []  # (test size, input shapes) of each predict_batch call

    def set_test_size(self, min_size, max_size=None):
        self.config.min_size_test, self.config.max_size_test = min_size, max_size

    def predict_batch(self, images):
        self.seen.append((self.config.min_size_test, [im.shape for im in images]))
        return self.inner.predict_batch(images)


def test_multiscale_scales_the_test_size_of_an_engine_that_resizes_itself(engine, fakes):
    sized = _SizedEngine(engine)
    image = fakes.blob_image((64, 80))
    out = run_tta(sized, image, "multiscale", scales=(0.5, 1.0, 1.5))
    # the image reaches the network at its own size; the network's test size carries the scale
    assert sorted(size for size, _ in sized.seen) == [400, 800, 1200]
    assert all(shapes == [(64, 80)] for _, shapes in sized.seen)
    assert (sized.config.min_size_test, sized.config.max_size_test) == (800, 1333)
    reference = engine.predict_batch([image])[0]
    for inst in out:
        assert inst.image_size == (64, 80) and len(inst) == len(reference)


def _reference_inverse(inst, t, image_size):
    """The step-by-step inverse (one Instances per quarter turn, then the mirror), as before the
    one-pass rewrite: the crops rotated with np.rot90 and mirrored with [:, ::-1]."""
    out = inst
    for _ in range((4 - t.k) % 4):
        h_img, w_img = out.image_size
        b = out.boxes
        widths = np.array([m.shape[1] for m in out.masks], np.int64)
        origins = np.stack([w_img - out.mask_origins[:, 1] - widths, out.mask_origins[:, 0]], 1)
        out = Instances((w_img, h_img), np.stack([b[:, 1], w_img - b[:, 2], b[:, 3], w_img - b[:, 0]], 1),
                        out.scores, out.classes, [np.rot90(m) for m in out.masks], origins)
    if t.flip:
        w_img = out.image_size[1]
        b = out.boxes
        widths = np.array([m.shape[1] for m in out.masks], np.int64)
        origins = np.stack([out.mask_origins[:, 0], w_img - out.mask_origins[:, 1] - widths], 1)
        out = Instances(out.image_size, np.stack([w_img - b[:, 2], b[:, 1], w_img - b[:, 0], b[:, 3]], 1),
                        out.scores, out.classes, [m[:, ::-1] for m in out.masks], origins)
    return out


@pytest.mark.parametrize("t", tta_transforms("flips+rot90"), ids=lambda t: t.name)
def test_one_pass_inverse_equals_the_step_by_step_inverse(t):
    rng = np.random.default_rng(3)
    size = (23, 31)
    out_size = t.output_size(size)
    masks, origins, boxes = [], [], []
    for _ in range(20):
        h, w = rng.integers(1, 8, 2)
        y0, x0 = rng.integers(0, out_size[0] - h + 1), rng.integers(0, out_size[1] - w + 1)
        masks.append(rng.random((h, w)).astype(np.float32))
        origins.append((y0, x0))
        boxes.append((x0 + 0.3, y0 + 0.6, x0 + w - 0.2, y0 + h - 0.7))
    inst = Instances(out_size, boxes, rng.random(20), rng.integers(0, 3, 20), masks, origins)
    got, want = invert_instances(inst, t, size), _reference_inverse(inst, t, size)
    assert got.image_size == want.image_size == size
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.mask_origins, want.mask_origins)
    np.testing.assert_array_equal(got.classes, want.classes)
    for a, b in zip(got.masks, want.masks):
        assert a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)

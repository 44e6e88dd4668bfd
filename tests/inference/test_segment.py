import threading

import numpy as np
import pytest

from napari_sartorius.instances import Instances
from napari_sartorius.inference.segment import (
    SegmentationCancelled,
    SegmentProgress,
    count_steps,
    run_to_completion,
    segment_image,
    segment_stack,
)


def drive(gen):
    progress = []
    result = run_to_completion(gen, progress.append)
    return result, progress


def test_single_engine_without_tta_is_passed_through(fakes):
    engine = fakes.BlobEngine()
    img = fakes.blob_image((60, 80), n=5)
    result, progress = drive(segment_image(img, [engine]))
    fakes.assert_same_instances(result, engine.predict_one(img))
    assert progress == [SegmentProgress(1, 1, "model 1/1 (blobs), none")]
    assert progress[0].fraction == 1.0


def test_the_job_is_lazy_and_reports_every_engine_and_tta_group(fakes):
    engines = [fakes.BlobEngine(name=f"m{i}") for i in range(3)]
    img = fakes.blob_image((60, 80), n=6, seed=2)
    gen = segment_image(img, engines, weights=[1, 2, 1], tta="flips+rot90", ensemble="wbf")
    assert all(e.batch_sizes == [] for e in engines)  # nothing runs before iteration
    result, progress = drive(gen)
    assert [p.step for p in progress] == list(range(1, 8))
    assert {p.total for p in progress} == {7} == {count_steps(img.shape, 3, tta="flips+rot90")}
    assert progress[2].message == "model 2/3 (m1), flips+rot90, batch 1/2"
    assert progress[-1].message.startswith("fused ") and "24 sources" in progress[-1].message
    assert all(e.batch_sizes == [4, 4] for e in engines)
    # 24 identical sources fuse back to the single engine's instances
    reference = engines[0].predict_one(img)
    assert len(result) == len(reference)
    order_r = np.lexsort(result.boxes.T[::-1])
    order_ref = np.lexsort(reference.boxes.T[::-1])
    np.testing.assert_allclose(result.boxes[order_r], reference.boxes[order_ref], atol=1e-4)
    np.testing.assert_allclose(result.scores[order_r], reference.scores[order_ref], atol=1e-5)
    for a, b in zip(order_r, order_ref):
        np.testing.assert_allclose(result.masks[a], reference.masks[b], atol=1e-5)


@pytest.mark.parametrize("how", ["event", "callable"])
def test_stop_request_cancels_cleanly(fakes, how):
    engines = [fakes.BlobEngine(name="a"), fakes.BlobEngine(name="b")]
    img = fakes.blob_image((40, 40), n=3)
    event = threading.Event()
    stop = event if how == "event" else event.is_set
    gen = segment_image(img, engines, tta="flips", stop=stop)
    first = next(gen)
    assert first.step == 1 and first.total == 3
    event.set()
    with pytest.raises(SegmentationCancelled, match="after 1 of 3 steps"):
        next(gen)
    assert engines[1].batch_sizes == []  # the second model never ran
    with pytest.raises(SegmentationCancelled):
        run_to_completion(segment_image(img, engines, stop=lambda: True))


def test_large_images_are_tiled_and_merged(fakes):
    engine = fakes.BlobEngine(big_area=200)
    img = fakes.blob_image((200, 300), n=30, radius=(4, 10), seed=4)
    reference = engine.predict_one(img)
    result, progress = drive(segment_image(img, [engine], max_tile=96, tile_overlap=40))
    assert progress[-1].total == len(progress) > 1 and "tile" in progress[0].message
    fakes.assert_same_instances(result, reference)
    fused, _ = drive(segment_image(img, [engine], tta="flips", max_tile=96, tile_overlap=40, ensemble="nms"))
    assert sorted(map(tuple, fused.boxes.tolist())) == sorted(map(tuple, reference.boxes.tolist()))


def test_stack_is_segmented_plane_by_plane(fakes):
    engine = fakes.BlobEngine()
    stack = np.stack([fakes.blob_image((40, 50), n=k + 1, seed=k) for k in range(3)])
    results, progress = drive(segment_stack(stack, [engine], tta="flips"))
    assert [len(r) for r in results] == [1, 2, 3]
    assert [p.step for p in progress] == list(range(1, 7))
    assert {p.total for p in progress} == {6}
    assert [p.plane for p in progress] == [0, 0, 1, 1, 2, 2]
    assert progress[2].message.startswith("plane 2/3: model 1/1")
    with pytest.raises(ValueError, match="stack"):
        run_to_completion(segment_stack(np.zeros((4, 4)), [engine]))


def test_class_orders_of_engines_are_aligned(fakes):
    a = fakes.BlobEngine(big_area=100, name="a")
    b = fakes.BlobEngine(big_area=100, name="b")
    b.class_names = ("big", "small")
    inner = b.predict_one

    def swapped(image):
        inst = inner(image)
        inst.classes = 1 - inst.classes
        return inst

    b.predict_one = swapped
    img = fakes.blob_image((60, 80), n=6, seed=1)
    result, _ = drive(segment_image(img, [a, b], ensemble="wbf"))
    reference = a.predict_one(img)
    assert len(result) == len(reference)  # b's classes were mapped to a's order, so all fused
    assert sorted(result.classes.tolist()) == sorted(reference.classes.tolist())
    c = fakes.BlobEngine(name="c")
    c.class_names = ("small", "huge")
    with pytest.raises(ValueError, match="disagree on their classes"):
        next(segment_image(img, [a, c]))


def test_bad_settings_fail_before_any_model_runs(fakes):
    engine = fakes.BlobEngine()
    img = fakes.blob_image((40, 40), n=2)
    for kwargs, match in [
        ({"ensemble": "vote"}, "unknown ensemble method"),
        ({"tta": "rot45"}, "unknown TTA mode"),
        ({"weights": [1, 2]}, "one positive weight per model"),
        ({"conf_type": "median"}, "conf_type"),
    ]:
        with pytest.raises(ValueError, match=match):
            next(segment_image(img, [engine], **kwargs))
    with pytest.raises(ValueError, match="height, width"):
        next(segment_image(np.zeros((2, 3, 4, 5)), [engine]))
    with pytest.raises(ValueError, match="at least one engine"):
        next(segment_image(img, []))
    with pytest.raises(ValueError, match="not an engine"):
        next(segment_image(img, [object()]))
    assert engine.batch_sizes == []


def test_gpu_out_of_memory_moves_the_engine_to_the_cpu_and_says_so(fakes, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    class GpuEngine(fakes.BlobEngine):
        def __init__(self):
            super().__init__(name="gpu")
            self.device = torch.device("cuda")
            self.moves = []

        def to(self, device):
            self.moves.append(str(device))
            self.device = torch.device(device)
            return self

        def predict_batch(self, images):
            if self.device.type == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
            return super().predict_batch(images)

    engine = GpuEngine()
    img = fakes.blob_image((40, 60), n=3)
    result, progress = drive(segment_image(img, [engine], tta="flips+rot90"))
    assert engine.moves == ["cpu"]
    assert "ran out of memory" in progress[0].warning and "CPU" in progress[0].warning
    assert all(p.warning is None for p in progress[1:])
    assert len(result) == 3


def test_engine_returning_the_wrong_number_of_results_is_reported(fakes):
    class Broken(fakes.BlobEngine):
        def predict_batch(self, images):
            return [Instances.empty(images[0].shape[:2])]

    with pytest.raises(ValueError, match="returned 1 results for 4 images"):
        run_to_completion(segment_image(fakes.blob_image((30, 30), n=1), [Broken(name="broken")], tta="flips"))


class _Broken:
    name = "broken"
    class_names = ("shsy5y", "astro", "cort")

    def predict_batch(self, images):
        raise IndexError("pop from empty list")


def test_a_failing_member_never_costs_the_others_result(fakes):
    good = fakes.BlobEngine(name="good")
    img = fakes.blob_image((60, 80), n=5)
    broken = _Broken()
    broken.class_names = tuple(good.class_names)
    result, progress = drive(segment_image(img, [broken, good], tta="flips"))
    warnings = [p.warning for p in progress if p.warning]
    assert warnings == ["model 1/2 (broken) failed and was left out: pop from empty list"]
    assert progress[-1].failed == ("broken",) and progress[-1].step == progress[-1].total
    alone, _ = drive(segment_image(img, [good], tta="flips"))
    fakes.assert_same_instances(result, alone)  # as if only the good model had been asked
    # two engines without TTA, one failing: the other's raw result is passed through unfused
    result, progress = drive(segment_image(img, [good, broken]))
    fakes.assert_same_instances(result, good.predict_one(img))
    assert progress[-1].step == progress[-1].total and progress[-1].failed == ("broken",)


def test_options_are_keyword_only(fakes):
    img = fakes.blob_image((20, 20), n=1)
    with pytest.raises(TypeError):
        segment_image(img, [fakes.BlobEngine()], [1.0])
    with pytest.raises(TypeError):
        count_steps(img.shape, 1, "flips")


def test_when_every_member_fails_the_first_error_propagates(fakes):
    img = fakes.blob_image((40, 40), n=2)
    a, b = _Broken(), _Broken()
    b.name = "also broken"
    with pytest.raises(IndexError, match="pop from empty list"):
        drive(segment_image(img, [a, b]))
    with pytest.raises(IndexError):
        drive(segment_image(img, [a]))

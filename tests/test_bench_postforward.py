"""benchmarks/bench_postforward.py: its canned engine answers flipped images with flipped detections,
and the script prints its figures (tiny settings)."""

import importlib.util
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_postforward.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_postforward", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_canned_engine_is_equivariant_under_flips():
    from napari_sartorius.inference.tta import run_tta

    image = np.random.default_rng(0).integers(0, 255, (60, 80)).astype(np.uint8)
    engine = load().CannedEngine(image, n_det=30, n_cells=10, seed=1)
    variants = run_tta(engine, image, "flips")
    assert len(variants) == 4
    for v in variants[1:]:  # mapped back onto the image, every variant is the identity's answer
        np.testing.assert_allclose(v.boxes, variants[0].boxes, atol=1e-4)
        np.testing.assert_array_equal(v.mask_origins, variants[0].mask_origins)
        for a, b in zip(v.masks, variants[0].masks):
            np.testing.assert_array_equal(a, b)


def test_it_prints_its_figures(capsys, monkeypatch):
    import napari_sartorius.synthetic as synthetic

    real = synthetic.make_sample
    monkeypatch.setattr(synthetic, "make_sample", lambda style, seed: real(style, seed=seed, shape=(64, 96)))
    load().main(["--detections", "40", "--cells", "12", "--images", "2", "--repeats", "1", "--post-workers", "0"])
    out = capsys.readouterr().out
    for line in ("segment_image, 3 engines x 4 flips", "fusion wbf of 12 sources", "fusion nms of 12 sources",
                 "post-processing of", "segment_folder, 1 engine"):
        assert line in out

"""benchmarks/bench_gpu.py runs on the CPU and prints its table (tiny settings)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.mark.slow
def test_bench_gpu_prints_its_table_on_the_cpu(capsys, monkeypatch):
    import napari_sartorius.synthetic as synthetic

    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real = synthetic.make_sample
    monkeypatch.setattr(synthetic, "make_sample", lambda style, seed: real(style, seed=seed, shape=(64, 96)))
    bench.main(["--device", "cpu", "--images", "1", "--test-size", "64", "--models", "2", "--detections", "5",
                "--threads", "1"])
    out = capsys.readouterr().out
    for row in ("1 model, no TTA, fp32", "1 model, no TTA, fp16", "2 models x 4 flips", "segment CLI on a folder",
                "time shares", "forward", "pasting", "fusion", "post-processing", "peak resident memory"):
        assert row in out
    # plain and prepared engines, one row each (the progress lines go to stderr)
    assert out.count("1 model, no TTA, fp32, plain") == 1
    assert out.count("1 model, no TTA, fp32, folded + channels-last") == 1

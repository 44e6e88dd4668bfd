"""The engine contract as Protocols: what counts as an engine, and the names used in messages."""

import pytest

from napari_sartorius.classical import ClassicalEngine
from napari_sartorius.inference.engine import Engine, MovableEngine, ResizingEngine, check_engine, engine_name
from napari_sartorius.inference.segment import run_to_completion, segment_image


class Minimal:
    class_names = ("cell",)

    def predict_batch(self, images):
        return []


def test_structural_engines(fakes):
    assert isinstance(ClassicalEngine(), Engine) and isinstance(fakes.BlobEngine(), Engine)
    assert isinstance(Minimal(), Engine) and not isinstance(Minimal(), (MovableEngine, ResizingEngine))
    assert engine_name(Minimal()) == "Minimal" and engine_name(fakes.BlobEngine(name="b")) == "b"
    assert check_engine(Minimal()) is not None


@pytest.mark.parametrize("thing", [object(), "classical", type("NoClasses", (), {"predict_batch": lambda s, i: []})()])
def test_non_engines_are_refused_before_anything_runs(fakes, thing):
    with pytest.raises(ValueError, match="is not an engine: it needs class_names and predict_batch"):
        check_engine(thing)
    with pytest.raises(ValueError, match="is not an engine"):
        run_to_completion(segment_image(fakes.blob_image((20, 20), n=1), [fakes.BlobEngine(), thing]))

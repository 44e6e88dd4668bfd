"""The per-viewer ensemble store (no Qt needed): members, observers, corrected layers."""

from types import SimpleNamespace

import pytest

from napari_sartorius._widgets.ensemble_store import CLASSICAL_NAME, EnsembleStore, store_for


def test_members_and_observers(tmp_path):
    store = EnsembleStore()
    events = []
    store.connect(lambda ev, payload: events.append((ev, payload)))
    assert [e.name for e in store.members] == [CLASSICAL_NAME]
    f = tmp_path / "m.pt"
    f.write_bytes(b"x")
    first = store.put_checkpoint(f, weight=2.5)
    assert events == [("added", first)] and first.path == f.resolve()
    again = store.put_checkpoint(f)  # the same file: replaced, weight kept
    assert again is not first and again.weight == 2.5
    assert [e.path for e in store.members].count(f.resolve()) == 1
    assert events[1] == ("removed", (1, first)) and events[2] == ("added", again)
    with pytest.raises(ValueError, match="cannot be removed"):
        store.remove(store.members[0])
    with pytest.raises(FileNotFoundError):
        store.put_checkpoint(tmp_path / "missing.pt")


def test_a_listener_of_a_deleted_widget_is_dropped():
    store = EnsembleStore()

    def dead(ev, payload):
        raise RuntimeError("wrapped C/C++ object has been deleted")

    store.connect(dead)
    store.mark_edited(SimpleNamespace(name="a labels"), "a")
    assert dead not in store._listeners


def test_corrected_layers_and_one_store_per_viewer():
    store = EnsembleStore()
    layer = SimpleNamespace(name="cells labels")
    store.mark_edited(layer, "cells")
    assert store.edited_labels("cells", [layer]) is layer and store.is_edited(layer)
    assert store.edited_labels("cells", []) is None  # the layer was deleted
    assert store.edited_labels("other") is None
    v1, v2 = SimpleNamespace(), SimpleNamespace()
    assert store_for(v1) is store_for(v1) and store_for(v1) is not store_for(v2)

import threading

import pytest

from napari_sartorius.stopping import stop_requested


def test_event_callable_and_none():
    ev = threading.Event()
    assert not stop_requested(None) and not stop_requested(ev)
    ev.set()
    assert stop_requested(ev)
    assert stop_requested(lambda: True) and not stop_requested(lambda: False)
    with pytest.raises(TypeError, match="threading.Event or a callable"):
        stop_requested("yes")

"""Layout helpers shared by the docks."""

from __future__ import annotations

from magicgui.widgets import Container

__all__ = ["scroll_area", "tabify_with_sibling_docks", "DOCK_OBJECT_NAME"]


def scroll_area(parent: Container, child: Container, min_height: int = 100):
    """Move ``child`` (a widget of ``parent``) into a vertical scroll area in its place and return
    the ``QScrollArea``.

    napari docks a container's inner Qt widget, so magicgui's own ``scrollable`` option is lost; without
    a scroll area a tall dock grows a 768-px window past the bottom of the screen. The widgets above
    ``child`` (the run controls) stay in view.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy

    layout = parent.native.layout()
    index = layout.indexOf(child.native)
    layout.removeWidget(child.native)
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setWidget(child.native)
    scroll.setMinimumHeight(min_height)
    scroll.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
    layout.insertWidget(index, scroll, 1)
    return scroll


#: objectName of every napari-sartorius dock's inner widget (how the docks find each other's Qt docks).
DOCK_OBJECT_NAME = "napari_sartorius_dock"


def tabify_with_sibling_docks(widget: Container) -> None:
    """Mark ``widget`` as a napari-sartorius dock and, once it is docked, put it in tabs with another
    napari-sartorius dock of the same dock area (the newest tab in front).

    Stacked one above the other, the Segment and Fine-tune docks need ~1,200 px of height; in tabs each
    gets the window's full height, so both are usable on a 1366 x 768 screen. Uses Qt's own dock API
    (the ``QMainWindow`` that holds the docks), not napari's private window attributes.
    """
    from qtpy.QtCore import QTimer

    widget.native.setObjectName(DOCK_OBJECT_NAME)
    QTimer.singleShot(0, lambda: _tabify(widget.native))


def _tabify(native) -> None:
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    try:
        dock = native.parentWidget()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parentWidget()
    except RuntimeError:  # the widget was deleted before it was docked
        return
    if dock is None or not isinstance(dock.parentWidget(), QMainWindow):
        return
    main = dock.parentWidget()
    area = main.dockWidgetArea(dock)
    for other in main.findChildren(QDockWidget):
        if other is dock or not other.isVisible() or main.dockWidgetArea(other) != area:
            continue
        if other.findChild(type(native), DOCK_OBJECT_NAME) is None:
            continue
        main.tabifyDockWidget(other, dock)
        dock.show()
        dock.raise_()
        return

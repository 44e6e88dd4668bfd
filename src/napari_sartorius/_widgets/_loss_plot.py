"""A small live plot of the training loss (and validation score) drawn with QPainter.

No plotting library: matplotlib is not a dependency, and a polyline over a few thousand points is
cheap to paint. The loss uses the left axis (the span of the losses seen, see :func:`loss_range`), on a log scale
when the losses span more than :data:`LOG_SPAN` (a start at 3 and a plateau at 0.3 both stay
readable; see :func:`use_log_scale`); validation scores, which live in [0, 1], are dots on their own
right-hand axis. The plot is at least :data:`MIN_HEIGHT` px tall.
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["LossPlot", "decimate", "loss_range", "use_log_scale", "MIN_HEIGHT"]

LOSS_COLOR = QColor(90, 160, 230)
SMOOTH_COLOR = QColor(250, 170, 40)
VAL_COLOR = QColor(110, 210, 110)
#: The plot's minimum height in pixels.
MIN_HEIGHT = 150
#: A loss span (max / min) above which the axis is logarithmic.
LOG_SPAN = 20.0
#: Exponential moving average factor of the smoothed curve (weight of the newest point).
SMOOTHING = 0.1


def decimate(points: list[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    """At most ``max_points`` points: runs of consecutive inner points are replaced by their mean (x and y).

    Keeps the first and last point exact so the curve spans the same x range.
    """
    n = len(points)
    if n <= max_points or max_points < 3:
        return list(points)
    m = max_points - 2  # inner points, each the mean of a run of the n - 2 inner input points
    bounds = [1 + round(k * (n - 2) / m) for k in range(m + 1)]
    out = [points[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            chunk = points[a:b]
            out.append((sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)))
    out.append(points[-1])
    return out


def loss_range(values: list[float]) -> tuple[float, float]:
    """The plotted loss range ``(low, high)``: the values' span plus 5 % either side, from 0 when the
    span reaches down to within a fifth of the maximum of 0 (so the start of a run is not all that shows)."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 0.5
    low = lo
    lo, hi = lo - pad, hi + pad
    if low >= 0 and lo < 0.2 * hi:  # losses are >= 0: never show a negative axis
        lo = 0.0
    return lo, hi


def use_log_scale(values: list[float]) -> bool:
    """Whether losses ``values`` are drawn on a log axis: all positive and spanning > :data:`LOG_SPAN`."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


class LossPlot(QWidget):
    """Live training curve: raw total loss, its moving average, validation scores.

    Feed it with :meth:`add_loss` and :meth:`add_score` (from the GUI thread); :meth:`clear` for a
    new run. :attr:`losses` / :attr:`scores` hold the points as ``(iteration, value)`` pairs.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.losses: list[tuple[float, float]] = []
        self.smoothed: list[tuple[float, float]] = []
        self.scores: list[tuple[float, float]] = []
        self.total_iterations = 0
        self.setMinimumHeight(MIN_HEIGHT)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip("total training loss (blue), its moving average (orange), validation score (green, right axis)")

    # -- data -----------------------------------------------------------------------------------
    def clear(self, total_iterations: int = 0) -> None:
        self.losses.clear()
        self.smoothed.clear()
        self.scores.clear()
        self.total_iterations = int(total_iterations)
        self.update()

    def add_loss(self, iteration: float, loss: float) -> None:
        """Append one iteration's loss; non-finite values are skipped (they would wreck the scale)."""
        if not math.isfinite(loss):
            return
        prev = self.smoothed[-1][1] if self.smoothed else loss
        self.losses.append((float(iteration), float(loss)))
        self.smoothed.append((float(iteration), prev + SMOOTHING * (float(loss) - prev)))
        self.update()

    def add_score(self, iteration: float, score: float) -> None:
        self.scores.append((float(iteration), float(score)))
        self.update()

    # -- painting -------------------------------------------------------------------------------
    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        p = QPainter(self)
        try:
            p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
            self._paint(p)
        finally:
            p.end()

    def _paint(self, p: QPainter) -> None:
        fg = self.palette().color(self.foregroundRole())
        fm = p.fontMetrics()
        left = fm.horizontalAdvance("0.000") + 8
        right = fm.horizontalAdvance("1.0") + 8 if self.scores else 8
        top, bottom = fm.height() // 2 + 2, fm.height() + 6
        area = QRectF(left, top, max(10, self.width() - left - right), max(10, self.height() - top - bottom))
        axis = QColor(fg)
        axis.setAlpha(140)
        p.setPen(QPen(axis, 1))
        p.drawRect(area)
        if not self.losses and not self.scores:
            p.drawText(area, Qt.AlignmentFlag.AlignCenter, "loss curve (starts with the first iteration)")
            return
        x_max = max(
            [float(self.total_iterations), 1.0]
            + [pt[0] for pt in self.losses[-1:]]
            + [pt[0] for pt in self.scores[-1:]]
        )
        values = [v for _, v in self.losses]
        log = use_log_scale(values)
        if log:  # plot log10 of the losses; the axis labels show the losses themselves
            y_lo, y_hi = math.log10(min(values)) - 0.05, math.log10(max(values)) + 0.05
        else:
            y_lo, y_hi = loss_range(values)
        fy = math.log10 if log else float

        def label(v: float) -> str:
            return f"{10 ** v:.3g}" if log else f"{v:.3g}"

        def to_px(x: float, y: float, lo: float, hi: float) -> QPointF:
            return QPointF(
                area.left() + area.width() * x / x_max,
                area.bottom() - area.height() * (max(lo, min(y, hi)) - lo) / (hi - lo),
            )

        # axis labels: loss range on the left, iterations at the bottom
        p.drawText(QRectF(0, area.top() - fm.height() / 2, left - 4, fm.height()),
                   Qt.AlignmentFlag.AlignRight, label(y_hi))
        p.drawText(QRectF(0, area.bottom() - fm.height() / 2, left - 4, fm.height()),
                   Qt.AlignmentFlag.AlignRight, label(y_lo))
        p.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), fm.height()),
                   Qt.AlignmentFlag.AlignRight, f"{int(x_max)} it.")
        if self.losses:
            p.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), fm.height()),
                       Qt.AlignmentFlag.AlignLeft, f"loss {self.losses[-1][1]:.3f}" + (" (log scale)" if log else ""))
        budget = max(8, int(area.width()) * 2)
        for pts, color, width in ((self.losses, LOSS_COLOR, 1.0), (self.smoothed, SMOOTH_COLOR, 2.0)):
            if len(pts) >= 2:
                poly = QPolygonF([to_px(x, fy(y), y_lo, y_hi) for x, y in decimate(pts, budget)])
                p.setPen(QPen(color, width))
                p.drawPolyline(poly)
            elif pts:
                p.setPen(QPen(color, 3.0))
                p.drawPoint(to_px(pts[0][0], fy(pts[0][1]), y_lo, y_hi))
        if self.scores:
            p.setPen(QPen(VAL_COLOR, 1.5))
            p.setBrush(VAL_COLOR)
            for x, y in self.scores:
                p.drawEllipse(to_px(x, y, 0.0, 1.0), 3.0, 3.0)
            p.drawText(QRectF(area.right() + 3, area.top() - fm.height() / 2, right, fm.height()),
                       Qt.AlignmentFlag.AlignLeft, "1.0")
            p.drawText(QRectF(area.right() + 3, area.bottom() - fm.height() / 2, right, fm.height()),
                       Qt.AlignmentFlag.AlignLeft, "0")

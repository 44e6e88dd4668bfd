"""Driving long jobs: the one place that runs a job generator, relays its progress and stops it.

A *job* is a generator that yields progress objects and *returns* its result (``StopIteration.value``),
as :func:`napari_sartorius.inference.segment.segment_image`, ``segment_stack``, the trainer and K-fold
do. It takes its stop request itself (a ``threading.Event`` or a callable, see
:mod:`napari_sartorius.stopping`) and polls it at safe points, so that it can stop cleanly (raise its
cancel exception, or save the state reached and return). Three helpers cover every loop that used to
be written by hand:

- :func:`run_job` (scripts, the CLI, tests): run a job to its end, passing each progress to a
  callback; return the result. ``stop=`` adds a stop check *between* steps for jobs that do not
  poll one themselves: the job is closed (its ``finally`` blocks run) and :class:`JobStopped` raised.
- :func:`relay` (nesting): inside another generator, ``result = yield from relay(job, transform)``
  re-yields ``transform(progress)`` for each step (skipping ``None``) and evaluates to the job's
  result: a stack loop over planes, K-fold over training runs, a dock's worker over the core's job.

In napari, a dock hands the job (or a ``relay`` of it) to ``napari.qt.threading.create_worker``:
``yielded`` gets the progress, ``returned`` the result, ``errored`` the job's exceptions (its cancel
exception included); Cancel sets the stop event the job polls. No Qt here. Every job loop of the
project (CLI, ``segment_stack``, ``run_training``, K-fold, the Segment dock's worker) goes through
these two functions.

Example::

    from napari_sartorius.jobs import run_job
    from napari_sartorius.inference.segment import segment_image

    inst = run_job(segment_image(image, engines, tta="flips"), lambda p: print(p.message))
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Iterator, TypeVar

from .stopping import stop_requested

__all__ = ["JobStopped", "run_job", "relay"]

P = TypeVar("P")
Q = TypeVar("Q")
R = TypeVar("R")

Job = Generator[P, Any, R]


class JobStopped(Exception):
    """:func:`run_job` stopped a job between two steps because its ``stop`` was set."""


def run_job(
    job: Generator[P, Any, R] | Iterator[P],
    on_progress: Callable[[P], Any] | None = None,
    *,
    stop=None,
) -> R:
    """Run ``job`` to its end and return its result (the generator's return value).

    Args:
        job: a job generator (see the module docstring).
        on_progress: called with every progress object, in order (its return value is ignored).
        stop: None, a ``threading.Event`` or a callable; checked before each step. When set, the job is
            closed (``GeneratorExit`` at its paused ``yield``, so its ``finally`` blocks run) and
            :class:`JobStopped` is raised. Jobs that poll their own stop request do not need it.

    Raises:
        JobStopped: ``stop`` was set between two steps.
        Whatever the job raises (its own cancel exception included) propagates unchanged.
    """
    done = 0
    while True:
        if stop_requested(stop):
            close = getattr(job, "close", None)
            if close is not None:
                close()
            raise JobStopped(f"stopped after {done} step(s)")
        try:
            progress = next(job)
        except StopIteration as finished:
            return finished.value
        done += 1
        if on_progress is not None:
            on_progress(progress)


def relay(job: Generator[P, Any, R], transform: Callable[[P], Q | None] | None = None) -> Generator[Q, Any, R]:
    """Re-yield ``job``'s progress (through ``transform``; ``None`` results are not yielded) and
    return its result: ``result = yield from relay(job, transform)`` inside another job.

    Closing the relay closes ``job`` too; exceptions of ``job`` propagate.
    """
    try:
        while True:
            try:
                progress = next(job)
            except StopIteration as finished:
                return finished.value
            out = progress if transform is None else transform(progress)
            if out is not None:
                yield out
    finally:
        job.close()


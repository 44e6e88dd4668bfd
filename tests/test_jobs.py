"""The job helpers: run to the end, relay nested progress, stop between steps."""

import threading

import pytest

from napari_sartorius.jobs import JobStopped, relay, run_job


def counting(n, log=None):
    try:
        for i in range(1, n + 1):
            yield i
        return f"done {n}"
    finally:
        if log is not None:
            log.append("closed")


def test_run_job_relays_progress_and_returns_the_result():
    seen = []
    assert run_job(counting(3), seen.append) == "done 3"
    assert seen == [1, 2, 3]
    assert run_job(counting(0)) == "done 0"


def test_errors_of_the_job_propagate():
    def failing():
        yield 1
        raise RuntimeError("model broke")

    with pytest.raises(RuntimeError, match="model broke"):
        run_job(failing())


def test_stop_between_steps_closes_the_job():
    stop = threading.Event()
    log = []
    seen = []

    def on_progress(p):
        seen.append(p)
        if p == 2:
            stop.set()

    with pytest.raises(JobStopped, match="after 2 step"):
        run_job(counting(5, log), on_progress, stop=stop)
    assert seen == [1, 2] and log == ["closed"]
    with pytest.raises(JobStopped, match="after 0 step"):
        run_job(counting(5), stop=lambda: True)


def test_relay_nests_jobs_and_skips_none():
    def outer():
        results = []
        for k in (2, 3):
            results.append((yield from relay(counting(k), lambda p, k=k: None if p == 1 else f"{k}:{p}")))
        return results

    seen = []
    assert run_job(outer(), seen.append) == ["done 2", "done 3"]
    assert seen == ["2:2", "3:2", "3:3"]


def test_closing_a_relay_closes_the_inner_job():
    log = []
    r = relay(counting(5, log))
    assert next(r) == 1
    r.close()
    assert log == ["closed"]

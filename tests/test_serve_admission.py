"""The serving engine's admission (no HTTP): the queue limit counts free slots per lane, shortest-first admission
takes the free slots for the requests of fewest steps, Retry-After follows the steps of the work ahead, and every
image still equals its offline one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from maskbit_runtime import Pipeline
from maskbit_runtime.serve import Engine, Overloaded

from conftest import ROOT

DEMO = ROOT / "runtime" / "demo" / "bundle"


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load(DEMO) as pipe:
        yield pipe


def _started(pipe, **options) -> Engine:
    return Engine(pipe, request_timeout=120, **options).start()


def _until(predicate, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_free_slot_of_the_other_lane_is_room(pipe):
    """One slot per lane, no queue: a long guided image fills the guided lane; an unguided request still fits (its
    own lane is empty), and a second guided one does not."""
    engine = _started(pipe, max_batch=1, max_queue=0)
    try:
        long = engine.submit(engine.request([0], num_steps=400))
        _until(lambda: engine.occupied == 1)
        unguided = engine.submit(engine.request([1], seed=3, num_steps=3, guidance_scale=0.0))
        with pytest.raises(Overloaded, match="queue is full"):
            engine.submit(engine.request([2], num_steps=3))
        assert unguided.ended.wait(60) and unguided.status == "done"
        offline = pipe.generate([1], seed=3, num_steps=3, guidance_scale=0.0)
        np.testing.assert_array_equal(unguided.images, offline.images)
        engine.cancel(long)
    finally:
        engine.stop()


def test_retry_after_follows_the_steps_ahead(pipe):
    engine = _started(pipe, max_batch=1, max_queue=0)
    try:
        engine.step_seconds = 0.01                   # fixed, so the estimate depends on the steps alone
        long = engine.submit(engine.request([0], num_steps=400))
        _until(lambda: engine.occupied == 1)
        engine.step_seconds = 0.01
        # 400 steps (fewer already taken) of one slot at 10 ms each: seconds, not the default 64 steps' 0.64 s
        assert 2 <= engine.retry_after() <= 4
        engine.cancel(long)
    finally:
        engine.stop()


@pytest.mark.parametrize("admission, first", [("fifo", "long"), ("shortest", "short")])
def test_admission_order(pipe, admission, first):
    """One slot; while a blocker runs, a long and then a short request wait: FIFO admits the long one first,
    shortest-first the short one. Either way each image equals its offline one."""
    engine = _started(pipe, max_batch=1, max_queue=8, admission=admission)
    finished: list[str] = []
    lock = threading.Lock()

    def on_end(name):
        def on_event(kind, data):
            if kind == "end":
                with lock:
                    finished.append(name)
        return on_event

    try:
        blocker = engine.submit(engine.request([0], num_steps=6, on_event=on_end("blocker")))
        _until(lambda: engine.occupied == 1)
        long = engine.submit(engine.request([1], seed=1, num_steps=12, on_event=on_end("long")))
        short = engine.submit(engine.request([2], seed=2, num_steps=2, on_event=on_end("short")))
        for request in (blocker, long, short):
            assert request.ended.wait(120) and request.status == "done", request.error
        assert finished == ["blocker", first, "long" if first == "short" else "short"]
        np.testing.assert_array_equal(long.images, pipe.generate([1], seed=1, num_steps=12).images)
        np.testing.assert_array_equal(short.images, pipe.generate([2], seed=2, num_steps=2).images)
    finally:
        engine.stop()


def test_unknown_admission_fails_in_one_line(pipe):
    with pytest.raises(Exception, match="admission 'random' is not one of fifo, shortest"):
        Engine(pipe, admission="random")


def test_alive_is_what_the_ray_health_check_asks(pipe):
    """`Engine.alive` (started, loop thread running) is what a Ray Serve replica's health check reports."""
    from maskbit_runtime.serve_ray import ReplicaApp
    replica = ReplicaApp.__new__(ReplicaApp)
    replica.engines = [Engine(pipe)]
    assert not replica.engines[0].alive
    with pytest.raises(RuntimeError, match="not running"):
        replica.check_health()
    replica.engines[0].start()
    assert replica.engines[0].alive
    replica.check_health()
    replica.engines[0].stop()
    assert not replica.engines[0].alive
    with pytest.raises(RuntimeError, match="not running"):
        replica.check_health()

"""chatterbox.serve.queue: turns at the model in arrival order, the wait visible and bounded."""
from __future__ import annotations

import threading
import time

import pytest

from chatterbox.serve.queue import ModelQueue, QueueFull


def test_requests_take_turns_in_arrival_order_and_see_who_was_ahead():
    queue = ModelQueue(max_waiting=8)
    order, turns, release = [], {}, threading.Event()

    def request(name):
        with queue.turn() as turn:
            turns[name] = turn
            order.append(name)
            if name == 0:
                release.wait(10)

    threads = []
    for name in range(5):  # each arrives once the one before it is queued
        threads.append(threading.Thread(target=request, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while queue.status()["waiting"] + queue.status()["running"] < name + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert queue.status() == {"running": True, "waiting": 4, "max_waiting": 8}
    release.set()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert [turns[n].ahead_at_arrival for n in range(5)] == [0, 1, 2, 3, 4]
    assert turns[4].waited_s > 0 and turns[0].waited_s < turns[4].waited_s
    assert queue.status() == {"running": False, "waiting": 0, "max_waiting": 8}


def test_a_full_queue_refuses_and_a_failed_turn_passes_it_on():
    queue = ModelQueue(max_waiting=0)
    with queue.turn():
        with pytest.raises(QueueFull, match="busy"):
            with queue.turn():
                pass
    with pytest.raises(RuntimeError):
        with queue.turn():
            raise RuntimeError("the model failed")
    with queue.turn() as turn:  # not stuck behind the failed one
        assert turn.ahead_at_arrival == 0
    with pytest.raises(ValueError):
        ModelQueue(max_waiting=-1)

"""Turns at one model for many users: first come, first served, with the wait visible and bounded.

The demo serves every user from one model, which runs one request at a time (a chat round keeps its
session's KV cache, so requests of different sessions are not batched). A plain lock would serve waiting
requests in no particular order and say nothing; this queue serves them in arrival order, tells each
request how many were ahead of it, lets a page show how many wait, and refuses new requests past
``max_waiting`` instead of letting them pile up.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


class QueueFull(Exception):
    """More requests wait than the queue takes."""


@dataclass
class Turn:
    ahead_at_arrival: int  # requests running or waiting when this one arrived
    waited_s: float = 0.0


class ModelQueue:
    def __init__(self, max_waiting: int = 16):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._changed = threading.Condition()
        self._next_ticket = 0  # handed to the next arrival
        self._serving = 0  # the ticket whose turn it is

    def status(self) -> dict:
        with self._changed:
            queued = self._next_ticket - self._serving
            return {"running": queued > 0, "waiting": max(0, queued - 1), "max_waiting": self.max_waiting}

    @contextmanager
    def turn(self) -> Iterator[Turn]:
        """Wait for this request's turn at the model, hold it for the ``with`` body, then pass it on."""
        arrived = time.perf_counter()
        with self._changed:
            ahead = self._next_ticket - self._serving
            if ahead > self.max_waiting:
                raise QueueFull(f"the model is busy: {ahead - 1} requests are waiting already; try again shortly")
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(lambda: self._serving == ticket)
        turn = Turn(ahead_at_arrival=ahead, waited_s=time.perf_counter() - arrived)
        try:
            yield turn
        finally:
            with self._changed:
                self._serving += 1
                self._changed.notify_all()

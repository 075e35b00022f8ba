"""The workers of one `crmsync serve --workers N` keep about as many connections each.

They accept from one listening socket, and the worker that wakes first takes every
connection waiting: 32 opened at once were split anywhere from 16/16 to 3/29. Both workers
get the same CPU, so the one holding more answers each of its connections that much
slower (the contact list page at two workers, wrk -c32: p99 37.6 ms at 16/16, 43.0 ms at
10/22, 50.1 ms for a search at 8/24).

So every quarter second each worker writes its count of open connections to a file in
the directory `serve` made for its workers, and reads the others'. One holding more than
its share (the total over the workers, rounded up) answers that many next requests with
`Connection: close`; HTTP clients reconnect, to whichever worker accepts first, and within
a second or so the counts are even. A client sees a new connection now and then, and only
while the counts are uneven. When the clients come back to the same worker (both idle,
whichever wakes first accepts) it waits longer and longer between tries, up to 16 s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from pathlib import Path

from crmsync.observability import CONNECTIONS_REBALANCED

INTERVAL_SECONDS = 0.25
# A file not written for this long is a dead worker's (uvicorn replaces one that dies,
# and the new one writes under its own pid).
STALE_SECONDS = 3.0
_PREFIX = "connections-"
log = logging.getLogger("crmsync.balance")


# While closing does not help (the clients reconnect to this worker again: with both
# workers idle, whichever wakes first accepts), a worker waits 1, 2, 4 ... up to this many
# rounds before it closes again, so that no client is made to reconnect over and over.
MAX_HOLD_ROUNDS = 64  # 16 s


class _Counts:
    open = 0  # client connections open in this process
    to_close = 0  # how many of them to close after their next answer
    closed = 0  # how many close_after_answer has closed, in all


_counts = _Counts()


def opened() -> None:
    _counts.open += 1


def closed() -> None:
    _counts.open -= 1


def close_after_answer() -> bool:
    """Whether the request just parsed should be answered with `Connection: close`."""
    if _counts.to_close <= 0:
        return False
    _counts.to_close -= 1
    _counts.closed += 1
    CONNECTIONS_REBALANCED.inc()
    return True


def excess(own: int, counts: list[int]) -> int:
    """How many connections over its share a worker holding `own` should close, when the
    live workers (itself among them) hold `counts`."""
    share = math.ceil(sum(counts) / len(counts)) if counts else own
    return max(0, own - share)


class Rounds:
    """How many connections a worker closes in each round, backing off while closing
    does not bring its count down."""

    def __init__(self) -> None:
        self.before = 0  # the worker's count when it last decided to close some
        self.hold = 0  # rounds left to wait
        self.backoff = 0  # the last wait, in rounds

    def to_close(self, own: int, counts: list[int], closed: int) -> int:
        """This round's number, for a worker holding `own` of `counts` that closed
        `closed` connections since the last round."""
        if closed:
            if own >= self.before:  # as many as before closing: they came back
                self.backoff = min(2 * self.backoff or 1, MAX_HOLD_ROUNDS)
                self.hold = self.backoff
            else:
                self.backoff = 0
        if self.hold:
            self.hold -= 1
            return 0
        self.before = own
        return excess(own, counts)


def _live_counts(directory: Path, now: float) -> list[int]:
    """The counts the live workers wrote, this one's among them."""
    counts = []
    for entry in os.scandir(directory):
        if not entry.name.startswith(_PREFIX) or entry.name.endswith(".tmp"):
            continue
        try:
            if now - entry.stat().st_mtime > STALE_SECONDS:
                continue
            text = Path(entry.path).read_text()
        except OSError:  # removed meanwhile
            continue
        if text.isdigit():
            counts.append(int(text))
    return counts


async def keep_balanced(directory: Path) -> None:
    """The worker's side of the balance, until cancelled (its file is then removed)."""
    own = directory / f"{_PREFIX}{os.getpid()}"
    written = own.with_name(own.name + ".tmp")
    failing, rounds, closed = False, Rounds(), _counts.closed
    try:
        while True:
            count = _counts.open
            try:
                written.write_text(str(count))
                written.replace(own)  # whole, for the others reading it
                counts = _live_counts(directory, time.time())
                _counts.to_close = rounds.to_close(count, counts, _counts.closed - closed)
                closed = _counts.closed
                failing = False
            except OSError as exc:  # the directory gone (a /tmp cleaner), a full disk
                _counts.to_close = 0  # no balance then, and no harm: it tries again
                if not failing:
                    log.warning("connection counts not shared: %s", exc)
                failing = True
            await asyncio.sleep(INTERVAL_SECONDS)
    finally:
        own.unlink(missing_ok=True)
        written.unlink(missing_ok=True)

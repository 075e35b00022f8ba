"""crmsync side by side with the Express peer, and with PostgreSQL's own limit.

    .venv/bin/python bench/run.py [--quick | --large] [--duration S] [--connections N]
                                  [--only a,b] [--workers 1,2] [--rounds N] [--plans]

One embedded PostgreSQL; crmsync and the peer on their own databases of it, seeded
identically through their HTTP APIs; wrk drives each, alternating A B A B. See
bench/README.md. Every process started here is stopped on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from load import BY_NAME, READS, SCENARIOS, Scenario, Target, first_sync, probe, run_wrk
from load import write_files as write_load_files
from physical import auto_explain, copy_rate, pgbench, write_plans
from procs import (
    PEER_SOURCE,
    ROOT,
    VENV_BIN,
    BenchError,
    CpuSample,
    Postgres,
    Processes,
    crmsync_pool,
    free_port,
    log,
    stopping_on_signals,
    wait_until_up,
)
from seed import ADMIN_EMAIL, PASSWORD, DataSet, seed_server, verify_counts

BENCH = ROOT / "bench"
SERVERS = ("crmsync", "express")  # A B: A first in every round
EXTRA = ("first_sync", "physical", "plans")


@dataclass
class Config:
    users: int
    contacts: int
    calls: int
    duration: float
    warmup: float
    rounds: int
    connections: int
    workers: list[int]
    only: set[str]
    plans: bool
    quick: bool
    large: bool
    workdir: Path


def parse_args(argv: list[str]) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small seed, short runs: a smoke test")
    p.add_argument("--large", action="store_true", help="1,000,000 calls instead of 200,000")
    p.add_argument("--calls", type=int, help="seeded calls (overrides --quick/--large)")
    p.add_argument("--duration", type=float, help="seconds per measured wrk run (15; quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of unmeasured warm-up per run (3)")
    p.add_argument("--rounds", type=int, help="A B rounds per scenario (2; quick 1)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--workers", default="1,2", help="worker counts to run both servers with")
    names = ", ".join([s.name for s in SCENARIOS] + list(EXTRA))
    p.add_argument("--only", help=f"comma-separated subset of: {names}")
    p.add_argument("--plans", action="store_true", help="also write EXPLAIN plans to bench/plans/")
    p.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "crmsync-bench"),
        help="scratch (PostgreSQL, the Express copy, logs), outside the repo",
    )
    a = p.parse_args(argv)
    if a.quick and a.large:
        p.error("--quick and --large exclude each other")
    only = (
        set(a.only.split(","))
        if a.only
        else {s.name for s in SCENARIOS} | {"first_sync", "physical"}
    )
    unknown = only - set(BY_NAME) - set(EXTRA)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if a.plans:
        only.add("plans")
    workdir = Path(a.workdir).resolve()
    if workdir.is_relative_to(ROOT):
        p.error("--workdir must be outside the project tree")
    calls = a.calls or (10_000 if a.quick else 1_000_000 if a.large else 200_000)
    return Config(
        users=10,
        contacts=2_000 if a.quick else 20_000,
        calls=calls,
        duration=a.duration or (3 if a.quick else 15),
        warmup=a.warmup if a.warmup is not None else (1 if a.quick else 3),
        rounds=a.rounds or (1 if a.quick else 2),
        connections=a.connections,
        workers=[int(w) for w in a.workers.split(",")],
        only=only,
        plans="plans" in only,
        quick=a.quick,
        large=a.large,
        workdir=workdir,
    )


def prepare_peer(procs: Processes, workdir: Path) -> Path:
    """A copy of the Express peer outside the project tree, with its locked dependencies."""
    peer = workdir / "express"
    lock = PEER_SOURCE / "package-lock.json"
    current = peer / "package-lock.json"
    fresh = (peer / "node_modules").is_dir() and current.exists()
    if fresh and current.read_bytes() == lock.read_bytes():
        same = all(
            (peer / f.name).exists() and (peer / f.name).read_bytes() == f.read_bytes()
            for f in PEER_SOURCE.iterdir()
        )
        if same:
            return peer
    if peer.exists():
        shutil.rmtree(peer)
    shutil.copytree(PEER_SOURCE, peer)
    for path in [peer, *peer.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    log("installing the Express peer's dependencies (npm ci)")
    done = procs.run(
        "npm ci", ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(peer)], timeout=600
    )
    if done.returncode != 0:
        raise BenchError(f"npm ci failed: {done.stderr[-2000:]}")
    return peer


class Servers:
    """crmsync and the peer, both started with one worker count."""

    def __init__(self, procs: Processes, pg: Postgres, cfg: Config, peer: Path, secret: str):
        self.procs, self.pg, self.cfg, self.peer, self.secret = procs, pg, cfg, peer, secret
        self.running: dict[str, Any] = {}
        self.urls: dict[str, str] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
        self.env = {
            "crmsync": base
            | {
                "CRMSYNC_DATABASE_URL": pg.url("crmsync"),
                "CRMSYNC_JWT_SECRET": secret,
                "CRMSYNC_DATA_DIR": str(cfg.workdir / "crmsync-data"),
                "CRMSYNC_BACKUP_DIR": str(cfg.workdir / "crmsync-backups"),
            },
            "express": base
            | {"DATABASE_URL": pg.url("express"), "JWT_SECRET": secret, "HOST": "127.0.0.1"},
        }

    def create_admins(self) -> None:
        commands = {
            "crmsync": [
                str(VENV_BIN / "crmsync"),
                "create-admin",
                "--email",
                ADMIN_EMAIL,
                "--name",
                "Admin",
            ],
            "express": ["node", str(self.peer / "create-admin.js"), ADMIN_EMAIL, "Admin"],
        }
        for name, argv in commands.items():
            env = self.env[name] | {"CRMSYNC_ADMIN_PASSWORD": PASSWORD}
            done = self.procs.run(f"{name} create-admin", argv, timeout=120, env=env)
            if done.returncode != 0:
                raise BenchError(f"{name} create-admin: {done.stdout}{done.stderr}")

    def start(self, workers: int) -> None:
        logs = self.cfg.workdir / "logs"
        logs.mkdir(exist_ok=True)
        for name in SERVERS:
            port = free_port()
            log_path = logs / f"{name}-w{workers}.log"
            if name == "crmsync":
                argv = [
                    str(VENV_BIN / "crmsync"),
                    "serve",
                    "--port",
                    str(port),
                    "--workers",
                    str(workers),
                ]
                env = self.env[name] | {"CRMSYNC_POOL_MAX_SIZE": str(crmsync_pool(workers))}
                cwd = self.cfg.workdir
            else:
                argv = ["node", "server.js"]
                env = self.env[name] | {"PORT": str(port), "WORKERS": str(workers)}
                cwd = self.peer
            proc = self.procs.start(name, argv, env=env, cwd=cwd, log_path=log_path)
            self.running[name] = proc
            self.urls[name] = f"http://127.0.0.1:{port}"
            wait_until_up(self.urls[name], proc, log_path)
            log(f"{name} up with {workers} worker(s) on {self.urls[name]}")

    def stop(self) -> None:
        for name in list(self.running):
            self.procs.stop(self.running.pop(name))


def api_totals(url: str, token: str, data: DataSet) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        for path, expected in (("/contacts", data.contacts), ("/calls", data.calls)):
            total = client.get(path, params={"page": 1, "limit": 1}).json().get("total")
            if total != expected:
                raise BenchError(f"{url}{path}: total {total}, expected {expected}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(measurements: list[dict[str, Any]], workers: int, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": name, "workers": workers}
    for server in SERVERS:
        runs = [
            m
            for m in measurements
            if m["scenario"] == name and m["workers"] == workers and m["server"] == server
        ]
        ok = [m for m in runs if "error" not in m]
        if not ok:
            out[server] = {"error": runs[0]["error"] if runs else "not run"}
            continue
        keys = (
            "rps",
            "units_per_s",
            "p50_ms",
            "p99_ms",
            "seconds",
            "server_cpu_ms",
            "postgres_cpu_ms",
            "machine_cores",
        )
        out[server] = {k: median([m[k] for m in ok if k in m]) for k in keys if k in ok[0]}
        out[server]["non_2xx"] = sum(m.get("non_2xx", 0) for m in ok)
        out[server]["socket_errors"] = sum(m.get("socket_errors", 0) for m in ok)
    a, b = out["crmsync"], out["express"]
    out["bar"] = _bar(name, a, b)
    if "units_per_s" in a and "units_per_s" in b and b["units_per_s"]:
        out["ratio"] = a["units_per_s"] / b["units_per_s"]
    elif "seconds" in a and "seconds" in b and a["seconds"]:
        out["ratio"] = b["seconds"] / a["seconds"]  # a speed-up: Express time / crmsync time
    return out


# Issue 7's bars: reads at least 1.0x the peer with p99 under 50 ms, uploads and sync 2x.
READ_RATIO, WRITE_RATIO, READ_P99_MS = 1.0, 2.0, 50.0
WRITES = {s.name for s in SCENARIOS if s.name.startswith("upload")} | {"sync"}


def needed_ratio(name: str) -> float | None:
    """The ratio to the peer a scenario's bar asks for; None for a row without a bar."""
    return READ_RATIO if name in READS else WRITE_RATIO if name in WRITES else None


def _bar(name: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    need = needed_ratio(name)
    if need is None or "units_per_s" not in a or "units_per_s" not in b or not b["units_per_s"]:
        return "-"
    ratio = a["units_per_s"] / b["units_per_s"]
    p99_ok = name not in READS or a["p99_ms"] < READ_P99_MS
    return "ok" if ratio >= need and p99_ok else "MISS"


def fmt_side(side: dict[str, Any], unit: str) -> str:
    if "error" in side:
        return f"{'n/a: ' + side['error'][:36]:<40}"
    if "seconds" in side:
        return f"{side['seconds']:>9.2f} s {'':>28}"
    flag = " !" if side.get("non_2xx") or side.get("socket_errors") else "  "
    rate = f"{side['units_per_s']:>9.0f} {unit + '/s':<7}"
    return f"{rate} {side['p50_ms']:>7.1f} {side['p99_ms']:>8.1f}{flag}    "


def fmt_cpu(side: dict[str, Any]) -> str:
    if "server_cpu_ms" not in side:
        return f"{'-':>24}"
    cell = (
        f"{side['server_cpu_ms']:.2f} + {side['postgres_cpu_ms']:.2f} ms"
        f" {side['machine_cores']:.1f} c"
    )
    return f"{cell:>24}"


def print_table(summary: list[dict[str, Any]], cfg: Config, physical: dict[str, Any]) -> None:
    print()
    print(
        f"crmsync vs Express: {cfg.contacts} contacts, {cfg.calls} calls; "
        f"{cfg.connections} connections, {cfg.duration:.0f} s x {cfg.rounds} round(s)"
    )
    head = f"{'rate':>17} {'p50 ms':>7} {'p99 ms':>8}      "
    for workers in cfg.workers:
        print(f"\n== {workers} worker(s) each")
        print(f"{'scenario':<38}{'crmsync ' + head}{'express ' + head}  ratio bar")
        for row in summary:
            if row["workers"] != workers:
                continue
            s = BY_NAME.get(row["scenario"])
            unit = s.unit if s else "req"
            title = s.title if s else "first sync (5k contacts, 30k calls)"
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
            line = f"{title:<38}{fmt_side(row['crmsync'], unit)}{fmt_side(row['express'], unit)}"
            print(f"{line}{ratio:>7} {row.get('bar', '-')}")
    print(
        "\nCPU milliseconds per request (server + PostgreSQL) and cores busy on the machine"
        f" (of {os.cpu_count()}), medians"
    )
    for workers in cfg.workers:
        print(f"\n== {workers} worker(s) each")
        print(f"{'scenario':<38}{'crmsync':>24}{'express':>24}")
        for row in summary:
            if row["workers"] == workers and row["scenario"] in BY_NAME:
                title = BY_NAME[row["scenario"]].title
                print(f"{title:<38}{fmt_cpu(row['crmsync'])}{fmt_cpu(row['express'])}")
    if physical:
        print("\n== PostgreSQL's own limit (same server)")
        for key, value in physical.items():
            if key == "fractions":
                for label, frac in value.items():
                    print(f"  crmsync {label}: {frac:.1%}")
            elif isinstance(value, dict) and "rows_per_s" in value:
                print(f"  COPY {value['rows']} call rows: {value['rows_per_s']:.0f} rows/s")
            elif isinstance(value, dict) and "tps" in value:
                print(f"  pgbench {key}: {value['tps']:.0f} tps (avg {value['latency_avg_ms']} ms)")
    print("\n'!' marks runs with non-2xx answers or socket errors (see the JSON).")


# crmsync's scenarios beside PostgreSQL's own limit: (scenario, physical key, its rate, label)
LIMITS = (
    ("upload_1000_new", "copy", "rows_per_s", "calls/s at 1000 per request vs COPY"),
    ("contacts_page", "list", "tps", "contact list req/s vs pgbench list"),
    ("contacts_search", "search", "tps", "search req/s vs pgbench search"),
)


def fractions(summary: list[dict[str, Any]], physical: dict[str, Any]) -> dict[str, float]:
    out = {}
    for scenario, key, field, label in LIMITS:
        for row in summary:
            mine = row["crmsync"].get("units_per_s")
            limit = physical.get(key, {}).get(field)
            if row["scenario"] == scenario and mine and limit:
                out[f"{label} ({row['workers']} worker(s))"] = mine / limit
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node.stdout.strip(),
        "wrk": (wrk.stdout + wrk.stderr).split("\n")[0].strip(),
        "crmsync_commit": commit,
        "crmsync_src_dirty": bool(dirty),
        "loadavg_at_start": os.getloadavg(),
    }


def run(cfg: Config, procs: Processes) -> dict[str, Any]:
    for tool in ("wrk", "node", "npm"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is not installed (make bench installs wrk with apt-get)")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(), "machine": machine()}
    peer = prepare_peer(procs, cfg.workdir)
    pg = Postgres(cfg.workdir / "pgdata")
    try:
        return _run(cfg, procs, pg, peer, result)
    finally:
        procs.stop_all()
        pg.stop()
        log("PostgreSQL stopped")


def _run(
    cfg: Config, procs: Processes, pg: Postgres, peer: Path, result: dict[str, Any]
) -> dict[str, Any]:
    settings = (
        "server_version",
        "shared_buffers",
        "max_connections",
        "work_mem",
        "synchronous_commit",
        "max_wal_size",
        "checkpoint_timeout",
        "wal_compression",
    )
    result["postgres"] = {s: pg.value("postgres", f"SHOW {s}") for s in settings}
    for db in SERVERS:
        pg.create_database(db)
    data = DataSet(users=cfg.users, contacts=cfg.contacts, calls=cfg.calls)
    result["config"] = {
        k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
        for k, v in vars(cfg).items()
    } | {"crmsync_pool_per_worker": {str(w): crmsync_pool(w) for w in cfg.workers}}
    servers = Servers(procs, pg, cfg, peer, secrets.token_hex(32))
    servers.create_admins()
    targets: dict[str, Target] = {}
    measurements: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    selected = [s for s in SCENARIOS if s.name in cfg.only]
    servers.start(cfg.workers[0])
    try:
        result["seed"] = seed_both(servers, pg, data, targets, cfg)
    finally:
        servers.stop()
    # Plans and PostgreSQL's own limit on the data set as seeded, like the reads below.
    if cfg.plans:
        result["plans"] = make_plans(pg, servers, targets, cfg)
    physical: dict[str, Any] = {}
    if "physical" in cfg.only:
        physical = measure_physical(procs, pg, data, cfg)
    # Reads first, for every worker count, then writes: a write run stores as much as its
    # server manages, so the faster one grows its tables more, and later reads would not
    # compare like with like. The first sync goes with the reads: it sends both servers
    # the same data, so they stay alike, and it pulls the whole changes feed, which after
    # the write runs would hold more contacts on the faster server's side.
    reads = [s for s in selected if not s.fresh_epoch]
    writes = [s for s in selected if s.fresh_epoch]
    for phase, with_first_sync in ((reads, "first_sync" in cfg.only), (writes, False)):
        if not phase and not with_first_sync:
            continue
        for workers in cfg.workers:
            # Each worker count starts from the same state on both sides: the first sync
            # and the write runs leave unvisited pages and GIN pending lists that
            # autovacuum would clean at a time of its own choosing.
            settle(pg)
            servers.start(workers)
            try:
                for name, target in targets.items():
                    target.base_url = servers.urls[name]
                    target.session = servers.running[name].pid
                measurements += measure(procs, phase, targets, data, cfg, workers, with_first_sync)
            finally:
                servers.stop()
    names = [s.name for s in selected] + (["first_sync"] if "first_sync" in cfg.only else [])
    summary += [summarize(measurements, w, n) for w in cfg.workers for n in names]
    if physical:
        physical["fractions"] = fractions(summary, physical)
    result |= {"measurements": measurements, "summary": summary, "physical": physical}
    result["finished_at"] = datetime.now(UTC).isoformat()
    print_table(summary, cfg, physical)
    return result


def settle(pg: Postgres) -> None:
    """VACUUM ANALYZE both databases, then a CHECKPOINT: the run that follows neither
    meets autovacuum's leftovers nor pays for writing out the dirty pages of what ran
    before it (the seed, the COPY, the write runs)."""
    for name in SERVERS:
        pg.execute(name, "VACUUM ANALYZE")
    pg.execute(SERVERS[0], "CHECKPOINT")
    log("VACUUM ANALYZE of both databases and a CHECKPOINT done")


def seed_both(
    servers: Servers, pg: Postgres, data: DataSet, targets: dict[str, Target], cfg: Config
) -> dict[str, Any]:
    import asyncio

    out: dict[str, Any] = {"users": data.users, "contacts": data.contacts, "calls": data.calls}
    emails = data.user_emails()
    for name in SERVERS:
        log(f"seeding {name}")
        seeded = asyncio.run(seed_server(name, servers.urls[name], data))
        counts = verify_counts(pg, name, data)
        api_totals(servers.urls[name], seeded.tokens[ADMIN_EMAIL], data)
        out[name] = {
            "seconds": seeded.seconds,
            "contacts_per_s": seeded.contacts_per_second,
            "calls_per_s": seeded.calls_per_second,
            "rows": counts,
        }
        targets[name] = Target(
            name, servers.urls[name], seeded.tokens[emails[1]], cfg.workdir / name
        )
    linked = {n: out[n]["rows"]["linked_calls"] for n in SERVERS}
    if len(set(linked.values())) != 1:
        log(f"WARNING: the servers linked different numbers of calls to contacts: {linked}")
    settle(pg)
    for name, target in targets.items():
        out[name] |= write_load_files(target, data, emails)
    log("seeded and verified both servers")
    return out


def measure(
    procs: Processes,
    selected: list[Scenario],
    targets: dict[str, Target],
    data: DataSet,
    cfg: Config,
    workers: int,
    with_first_sync: bool,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in selected:
        broken: dict[str, str] = {}
        for round_ in range(cfg.rounds):
            for name in SERVERS:
                target = targets[name]
                row: dict[str, Any] = {"scenario": s.name, "server": name, "workers": workers}
                row["round"] = round_
                row["connections"] = min(cfg.connections, s.max_connections or cfg.connections)
                if name in broken:
                    continue
                reason = probe(s, target) if round_ == 0 else None
                if reason:
                    broken[name] = reason
                    out.append(row | {"error": reason})
                    log(f"{s.name} on {name}: skipped, probe answered {reason[:120]}")
                    continue
                epoch = target.next_epoch() if s.fresh_epoch else 0
                conns = min(cfg.connections, s.max_connections or cfg.connections)
                seconds = max(cfg.duration, s.min_seconds)
                try:
                    if cfg.warmup:
                        run_wrk(
                            procs, s, target, seconds=cfg.warmup, connections=conns, epoch=epoch
                        )
                    if s.fresh_epoch and not s.dup:
                        epoch = target.next_epoch()
                    before = CpuSample.take(target.session)
                    m = run_wrk(
                        procs,
                        s,
                        target,
                        seconds=seconds,
                        connections=conns,
                        epoch=epoch,
                    )
                    m |= before.until(CpuSample.take(target.session), m["requests"])
                except BenchError as exc:
                    broken[name] = str(exc)
                    out.append(row | {"error": str(exc)})
                    log(f"{s.name} on {name}: {exc}")
                    continue
                out.append(row | m)
                flag = f"  non-2xx {m['non_2xx']}" if m["non_2xx"] else ""
                if workers > 1:
                    flag += f"  split {'/'.join(map(str, m['connections_split']))}"
                log(
                    f"{s.name:<17} {name:<8} w{workers} r{round_}: {m['units_per_s']:9.0f} {s.unit}/s "
                    f"p50 {m['p50_ms']:.1f} ms p99 {m['p99_ms']:.1f} ms{flag}"
                )
    if with_first_sync:
        for round_ in range(cfg.rounds):
            for name in SERVERS:
                row = {
                    "scenario": "first_sync",
                    "server": name,
                    "workers": workers,
                    "round": round_,
                }
                try:
                    fs = first_sync(targets[name], data)
                except BenchError as exc:
                    out.append(row | {"error": str(exc)})
                    log(f"first_sync on {name}: {exc}")
                    continue
                out.append(row | fs)
                log(f"first_sync        {name:<8} w{workers} r{round_}: {fs['seconds']:.2f} s")
    return out


def measure_physical(procs: Processes, pg: Postgres, data: DataSet, cfg: Config) -> dict[str, Any]:
    from load import fragments

    log("PostgreSQL's own limit: COPY and pgbench on the crmsync database")
    since = data.calls_start.isoformat()
    out: dict[str, Any] = {"copy": copy_rate(pg, "crmsync", cfg.workdir, since)}
    if out["copy"]["rows"] != data.calls:
        log(f"WARNING: COPY took {out['copy']['rows']} rows, {data.calls} were seeded")
    out |= pgbench(
        procs,
        pg,
        "crmsync",
        cfg.workdir,
        pages=-(-data.contacts // 50),
        fragments=fragments(data),
        seconds=cfg.duration,
        clients=cfg.connections,
    )
    return out


def make_plans(
    pg: Postgres, servers: Servers, targets: dict[str, Target], cfg: Config
) -> dict[str, Any]:
    # Plans of a small seed say little (PostgreSQL rightly scans small tables): only the
    # full-size ones go to bench/plans/.
    plans_dir = cfg.workdir / "plans" if cfg.quick else BENCH / "plans"
    log(f"plans: auto_explain on, one request per read query, into {plans_dir}")
    out: dict[str, Any] = {}
    for name in SERVERS:
        auto_explain(pg, name, on=True)
    try:
        servers.start(1)
        for name in SERVERS:
            target = targets[name]
            out[name] = write_plans(
                pg, name, servers.urls[name], target.token, target.files, plans_dir / name
            )
    finally:
        servers.stop()
        for name in SERVERS:
            auto_explain(pg, name, on=False)
    seq = {n: [k for k, v in out[n].items() if v["seq_scans"]] for n in SERVERS}
    log(f"plans written; endpoints with a sequential scan of call_logs or contacts: {seq}")
    return out


def results_path(cfg: Config) -> Path:
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    suffix = "-quick" if cfg.quick else ""
    path = BENCH / "results" / f"{day}{suffix}.json"
    if path.exists() and not cfg.quick:
        path = path.with_name(f"{day}-{datetime.now(UTC).strftime('%H%M%S')}.json")
    return path


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    procs = Processes()
    started = time.monotonic()
    try:
        with stopping_on_signals():
            result = run(cfg, procs)
    except KeyboardInterrupt:
        log("interrupted; every process started was stopped")
        return 130
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        procs.stop_all()
    result["wall_seconds"] = time.monotonic() - started
    path = results_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    log(f"results written to {path.relative_to(ROOT)} in {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

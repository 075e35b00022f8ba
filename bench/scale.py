"""crmsync alone at a hundred times the team's size: 2,000,000 contacts, 10,000,000 calls.

    .venv/bin/python bench/scale.py [--contacts N] [--calls N] [--duration S] [--workers 1,2]

One embedded PostgreSQL, seeded through the HTTP API like `make bench` (users, contacts by
POST /contacts/batch, calls by POST /calls in batches of 1000); then the full
/contacts/changes pull a new phone makes, the plan of every read query (sequential scans
of contacts or call_logs reported), one request's latency per query shape (median of 9, an
idle server) and wrk at 32 connections on every read and write scenario with 1 and 2
workers. No peer: this asks whether the design holds at size, not who is faster.
Results in bench/results/scale-<date>-<time>.json. About an hour on 2 cores at the default size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from load import BY_NAME, Target, fragments, get_json, run_wrk, walk
from physical import auto_explain, plan_requests, write_plans
from procs import (
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
from seed import ADMIN_EMAIL, PASSWORD, DataSet, seed_server

READS = [
    "auth_me",
    "contacts_page",
    "contacts_search",
    "contact_get",
    "contacts_changes",
    "calls_first",
    "calls_deep",
    "call_history",
]
WRITES = ["upload_100_new", "upload_1000_new", "contact_create", "sync"]
SIZES_SQL = """
SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class
WHERE relname IN ('contacts', 'call_logs', 'sync_audit')"""


class Scale:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs = Processes()
        self.pg = Postgres(work / "pg")
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        self.out: dict[str, Any] = {
            "crmsync_commit": commit,
            "started": datetime.now(UTC).isoformat(),
            "contacts": args.contacts,
            "calls": args.calls,
        }
        self.env: dict[str, str] = {}
        self.session = 0  # the running server's process group

    def start(self, workers: int) -> str:
        port = free_port()
        argv = [str(VENV_BIN / "crmsync"), "serve", "--port", str(port), "--workers", str(workers)]
        env = self.env | {"CRMSYNC_POOL_MAX_SIZE": str(crmsync_pool(workers))}
        proc = self.procs.start(
            "crmsync", argv, env=env, cwd=self.work, log_path=self.work / "server.log"
        )
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, proc, self.work / "server.log")
        self.session = proc.pid
        return url

    def stop_server(self) -> None:
        self.procs.stop_all()

    def run(self) -> dict[str, Any]:
        self.pg.create_database("crmsync")
        base = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
        self.env = base | {
            "CRMSYNC_DATABASE_URL": self.pg.url("crmsync"),
            "CRMSYNC_JWT_SECRET": secrets.token_hex(32),
            "CRMSYNC_DATA_DIR": str(self.work / "data"),
            "CRMSYNC_BACKUP_DIR": str(self.work / "backups"),
        }
        argv = [str(VENV_BIN / "crmsync"), "create-admin", "--email", ADMIN_EMAIL, "--name", "A"]
        done = self.procs.run(
            "create-admin", argv, timeout=120, env=self.env | {"CRMSYNC_ADMIN_PASSWORD": PASSWORD}
        )
        if done.returncode != 0:
            raise BenchError(f"create-admin: {done.stdout}{done.stderr}")
        data = DataSet(users=10, contacts=self.args.contacts, calls=self.args.calls)
        url = self.start(2)
        seeded = asyncio.run(seed_server("crmsync", url, data))
        self.out["seed"] = {
            "seconds": seeded.seconds,
            "contacts_per_s": seeded.contacts_per_second,
            "calls_per_s": seeded.calls_per_second,
        }
        log(f"seeded: {self.out['seed']}")
        self.stop_server()
        started = time.monotonic()
        self.pg.execute("crmsync", "VACUUM ANALYZE")
        self.out["vacuum_analyze_s"] = time.monotonic() - started
        self.out["sizes"] = {r[0]: r[1] for r in self.pg.execute("crmsync", SIZES_SQL)[0]}
        emails = data.user_emails()
        target = Target("crmsync", url, seeded.tokens[emails[1]], self.work / "files")
        self.write_files(target, data, emails)
        self.plans_and_latency(target)
        self.load(target)
        return self.out

    def write_files(self, target: Target, data: DataSet, emails: list[str]) -> None:
        """The load scripts' files, from the database and the API (a walk of every contact
        page is an hour at this size: contact ids come from a random sample instead)."""
        files = target.files
        files.mkdir(parents=True, exist_ok=True)

        def put(name: str, lines: list[str]) -> None:
            (files / name).write_text("\n".join(lines) + "\n")

        sample = "SELECT id::text FROM contacts ORDER BY random() LIMIT 2000"
        ids = [r[0] for r in self.pg.execute("crmsync", sample)[0]]
        pages = -(-data.contacts // 50)
        put("contacts_page", [f"/contacts?page={p}&limit=50" for p in range(1, pages + 1)])
        put("contact_get", [f"/contacts/{i}" for i in ids])
        put("call_history", [f"/calls/{i}" for i in ids])
        put("contacts_search", [f"/contacts/search?q={quote(f)}" for f in fragments(data)])
        target.base_url = self.start(1)
        with target.client() as client:
            started = time.monotonic()
            changes, changed = walk(client, "/contacts/changes?limit=200", 1_000_000)
            pull = {
                "seconds": time.monotonic() - started,
                "pages": len(changes),
                "items": len(changed),
                "distinct": len({c["id"] for c in changed}),
            }
            if pull["distinct"] != pull["items"] or pull["items"] < data.contacts:
                raise BenchError(f"changes pull: {pull}")
            self.out["changes_full_pull"] = pull
            log(f"changes full pull: {pull}")
            put("contacts_changes", changes)
            put("calls_first", ["/calls"])
            walked, _ = walk(client, "/calls?limit=200", 2500)
            put(
                "calls_deep",
                [p.replace("limit=200", "limit=50") for p in walked[len(walked) // 2 :]],
            )
            put("auth_me", ["/auth/me"])
            put("user_id", [get_json(client, "/auth/me")["id"]])
            cursor = get_json(client, "/sync/state").get("contacts_cursor")
            (files / "sync_cursor").write_text(cursor or "")
        self.stop_server()
        put("login", [f"{e} {PASSWORD}" for e in emails])
        put("phones", [f"+1 {p[2:5]}-{p[5:8]}-{p[8:]}" for p in data.phones[:5000]])

    def plans_and_latency(self, target: Target) -> None:
        auto_explain(self.pg, "crmsync", True)
        url = self.start(1)
        plans = write_plans(
            self.pg, "crmsync", url, target.token, target.files, self.work / "plans"
        )
        self.out["plans"] = plans
        self.stop_server()
        auto_explain(self.pg, "crmsync", False)
        target.base_url = self.start(1)
        latency: dict[str, float] = {}
        with target.client() as client:
            for label, path in plan_requests(target.files).items():
                times = []
                for _ in range(9):
                    started = time.perf_counter()
                    response = client.get(path)
                    times.append((time.perf_counter() - started) * 1000)
                    if response.status_code != 200:
                        raise BenchError(f"GET {path}: {response.status_code}")
                latency[label] = round(sorted(times)[4], 2)
                log(f"latency {label}: {latency[label]} ms")
        self.out["single_request_ms"] = latency
        self.stop_server()

    def load(self, target: Target) -> None:
        rows: list[dict[str, Any]] = []
        self.out["wrk"] = rows
        for workers in self.args.workers:
            target.base_url = self.start(workers)
            target.session = self.session
            for name in READS + WRITES:
                scenario = BY_NAME[name]
                run_wrk(
                    self.procs,
                    scenario,
                    target,
                    seconds=2,
                    connections=32,
                    epoch=target.next_epoch(),
                )
                before = CpuSample.take(target.session)
                m = run_wrk(
                    self.procs,
                    scenario,
                    target,
                    seconds=self.args.duration,
                    connections=32,
                    epoch=target.next_epoch(),
                )
                m |= before.until(CpuSample.take(target.session), m["requests"])
                rows.append({"workers": workers, "scenario": name, **m})
                log(
                    f"w{workers} {name:<17} {m['rps']:7.0f} req/s {m['units_per_s']:8.0f} units/s"
                    f" p50 {m['p50_ms']:.1f} p99 {m['p99_ms']:.1f} ms"
                    f" cpu/request {m['server_cpu_ms']:.2f}+{m['postgres_cpu_ms']:.2f} ms"
                    f" non-2xx {m['non_2xx']}"
                )
            self.stop_server()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contacts", type=int, default=2_000_000)
    p.add_argument("--calls", type=int, default=10_000_000)
    p.add_argument("--duration", type=float, default=10, help="seconds per measured wrk run")
    p.add_argument("--workers", default="1,2", help="worker counts (1,2)")
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="crmsync-scale-") as tmp, stopping_on_signals():
        scale = Scale(args, Path(tmp))
        try:
            out = scale.run()
        finally:
            scale.procs.stop_all()
            scale.pg.stop()
    name = f"scale-{datetime.now(UTC):%Y-%m-%d-%H%M%S}.json"
    (ROOT / "bench" / "results" / name).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    log(f"results in bench/results/{name}")


if __name__ == "__main__":
    main()

"""What PostgreSQL itself can do on the same server (COPY, pgbench), and the EXPLAIN
(ANALYZE, BUFFERS) of every list, search, history and changes query as each server runs it."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
from procs import BenchError, Postgres, Processes, log

COPY_COLUMNS = [
    "user_id",
    "contact_id",
    "phone_raw",
    "phone_normalized",
    "direction",
    "duration_seconds",
    "timestamp",
]


def copy_rate(pg: Postgres, database: str, scratch: Path, since: str) -> dict[str, Any]:
    """COPY the seeded call rows (those at or after `since`: the load scripts' calls are
    older) into an empty table shaped like call_logs, with the same indexes (CREATE TABLE
    ... LIKE ... INCLUDING ALL; no foreign keys), in one COPY."""

    async def go() -> dict[str, Any]:
        conn = await asyncpg.connect(pg.url(database))
        try:
            path = scratch / "calls.copy"
            columns = ", ".join(f'"{c}"' for c in COPY_COLUMNS)
            query = f"SELECT {columns} FROM call_logs WHERE \"timestamp\" >= '{since}'"
            await conn.copy_from_query(query, output=path)
            await conn.execute("DROP TABLE IF EXISTS bench_copy")
            await conn.execute("CREATE TABLE bench_copy (LIKE call_logs INCLUDING ALL)")
            rows = int(await conn.fetchval(query.replace(f"SELECT {columns}", "SELECT count(*)")))
            started = time.perf_counter()
            await conn.copy_to_table("bench_copy", source=path, columns=COPY_COLUMNS)
            seconds = time.perf_counter() - started
            indexes = await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE tablename = 'bench_copy'"
            )
            await conn.execute("DROP TABLE bench_copy")
            path.unlink()
            return {
                "rows": rows,
                "seconds": seconds,
                "rows_per_s": rows / seconds,
                "indexes": indexes,
            }
        finally:
            await conn.close()

    return asyncio.run(go())


class _Capture:
    """Stands in for a connection: records the statements crmsync's services would run."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.statements.append((sql, args))
        return []

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.statements.append((sql, args))
        return 0


def _literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def crmsync_sql(kind: str, arg: str = "", page: int = 2) -> tuple[str, tuple[Any, ...]]:
    """The SQL crmsync's contact list (page mode) or name search (first page) runs now,
    taken from its own service code, so pgbench always runs the current queries."""
    from crmsync.contacts import service
    from crmsync.pagination import PageRequest

    conn = _Capture()
    if kind == "list":
        request = PageRequest(limit=50, page=page, cursor=None, key=b"bench")
        asyncio.run(service.contact_list(conn, request))  # type: ignore[arg-type]
    else:
        request = PageRequest(limit=50, page=None, cursor=None, key=b"bench")
        asyncio.run(service.contact_search(conn, request, q=arg))  # type: ignore[arg-type]
    return conn.statements[0]


def pgbench_script(sql: str, args: tuple[Any, ...], variables: dict[int, str]) -> str:
    """The statement with $n as a pgbench :variable (variables) or a literal (the rest)."""

    def sub(m: re.Match[str]) -> str:
        n = int(m.group(1))
        return f":{variables[n]}" if n in variables else _literal(args[n - 1])

    return re.sub(r"\$(\d+)", sub, sql).strip() + ";\n"


def pgbench(
    procs: Processes,
    pg: Postgres,
    database: str,
    scratch: Path,
    *,
    pages: int,
    fragments: list[str],
    seconds: float,
    clients: int,
) -> dict[str, Any]:
    """Transactions/s of the contact list (random page, with the exact count) and of the
    name search (3-letter fragments), the queries crmsync's endpoints run."""
    binary: Path | str = pg.bin_dir / "pgbench"
    if not Path(binary).exists():
        binary = shutil.which("pgbench") or "pgbench"
    scripts = scratch / "pgbench"
    scripts.mkdir(exist_ok=True)
    sql, args = crmsync_sql("list", page=2)
    offset = args.index(50)  # page 2 of 50: the OFFSET parameter
    script = f"\\set off random(0, {max(pages - 1, 0)}) * 50\n"
    script += pgbench_script(sql, args, {offset + 1: "off"})
    (scripts / "list.sql").write_text(script)
    search_files = []
    for i, f in enumerate(fragments[:20]):
        path = scripts / f"search{i}.sql"
        path.write_text(pgbench_script(*crmsync_sql("search", f), {}))
        search_files.append(path)
    out = {}
    for name, files in (("list", [scripts / "list.sql"]), ("search", search_files)):
        argv = [str(binary), "-n", "-M", "prepared", "-j", "2", "-c", str(clients)]
        argv += ["-T", str(max(1, round(seconds))), "-h", pg.socket_dir, "-U", "postgres"]
        for script_file in files:
            argv += ["-f", str(script_file)]
        argv.append(database)
        done = procs.run(f"pgbench {name}", argv, timeout=seconds + 60)
        tps = re.search(r"tps = ([\d.]+)", done.stdout)
        latency = re.search(r"latency average = ([\d.]+) ms", done.stdout)
        if done.returncode != 0 or not tps:
            raise BenchError(f"pgbench {name} failed: {done.stderr[-800:]}")
        out[name] = {
            "tps": float(tps.group(1)),
            "latency_avg_ms": float(latency.group(1)) if latency else None,
        }
    return out


# ---- plans

AUTO_EXPLAIN = {
    "session_preload_libraries": "auto_explain",
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_analyze": "on",
    "auto_explain.log_buffers": "on",
    "auto_explain.log_timing": "on",
    "auto_explain.log_format": "text",
}
SEQ_SCAN = re.compile(r"Seq Scan on (call_logs|contacts)\b")


def auto_explain(pg: Postgres, database: str, on: bool) -> None:
    """Every statement on `database`'s new sessions logs its EXPLAIN (ANALYZE, BUFFERS)."""
    if on:
        statements = [f"ALTER DATABASE {database} SET {k} = '{v}'" for k, v in AUTO_EXPLAIN.items()]
    else:
        statements = [f"ALTER DATABASE {database} RESET ALL"]
    pg.execute("postgres", *statements)


def plan_requests(files: Path) -> dict[str, str]:
    """One request per read query shape, ids and cursors from the load scripts' files."""

    def line(name: str, at: float = 0.0) -> str:
        lines = (files / name).read_text().splitlines()
        return lines[min(int(len(lines) * at), len(lines) - 1)]

    contact_path = line("contact_get")
    contact_id = contact_path.rsplit("/", 1)[1]
    digits = re.sub(r"\D", "", line("phones"))[1:]  # the 10 digits after +1
    now = datetime.now(UTC).replace(microsecond=0)  # two months in the seeded year
    since = (now - timedelta(days=200)).isoformat()
    until = (now - timedelta(days=140)).isoformat()
    return {
        "contacts_first_page": "/contacts?page=1&limit=50",
        "contacts_middle_page": line("contacts_page", 0.5),
        "contacts_last_page": line("contacts_page", 1.0),
        "contacts_cursor_first": "/contacts",
        "search_name": line("contacts_search"),
        "search_name_page2": line("contacts_search") + "&page=2",
        "search_phone_digits": f"/contacts/search?q={digits[3:7]}",
        "contact_by_id": contact_path,
        "contact_lookup": f"/contacts/lookup?phone={quote(line('phones'))}",
        "changes_first": "/contacts/changes?limit=200",
        "changes_middle": line("contacts_changes", 0.5),
        "calls_first": "/calls",
        "calls_deep_cursor": line("calls_deep", 1.0),
        "calls_middle_page": "/calls?page=100&limit=50",
        "calls_deep_page": "/calls?page=9000&limit=50",
        "calls_of_user": "/calls?user_id=" + line("user_id"),
        "calls_of_user_page": "/calls?page=50&user_id=" + line("user_id"),
        "calls_missed": "/calls?direction=missed",
        "calls_missed_page": "/calls?page=50&direction=missed",
        "calls_since_until": f"/calls?since={quote(since)}&until={quote(until)}",
        "calls_since_until_page": f"/calls?page=2&since={quote(since)}&until={quote(until)}",
        "call_history": f"/calls/{contact_id}",
        "call_history_page": f"/calls/{contact_id}?page=1",
        "sync_records": "/sync",
        "sync_state": "/sync/state",
    }


def write_plans(
    pg: Postgres, name: str, base_url: str, token: str, files: Path, out_dir: Path
) -> dict[str, Any]:
    """Send each request once with auto_explain on; keep what PostgreSQL logged for it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.txt"):
        old.unlink()
    findings: dict[str, Any] = {}
    with httpx.Client(base_url=base_url, timeout=120) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        for label, path in plan_requests(files).items():
            client.get(path)  # warm: plans of a cold first statement are not the steady ones
            time.sleep(0.3)
            start = pg.log_path.stat().st_size
            response = client.get(path)
            time.sleep(0.5)
            with open(pg.log_path, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            body = f"-- {name}: GET {path} -> {response.status_code}\n\n{text}"
            (out_dir / f"{label}.txt").write_text(body)
            scans = sorted(set(SEQ_SCAN.findall(text)))
            findings[label] = {"status": response.status_code, "seq_scans": scans}
            if scans:
                log(f"plans {name} {label}: sequential scan of {', '.join(scans)}")
    return findings

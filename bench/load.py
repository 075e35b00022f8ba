"""The measured scenarios: the files their wrk scripts read, a probe that each server
answers before it is measured, the wrk runs themselves, and the first sync of a phone."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson
from procs import BenchError, Processes
from seed import PASSWORD, DataSet

LUA_DIR = Path(__file__).resolve().parent / "lua"
MAX_WALK_PAGES = 2500  # GET /calls pages walked to find deep cursors (500,000 calls deep)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    script: str
    unit: str = "req"  # what per_request counts: requests, calls or contacts
    per_request: int = 1
    fresh_epoch: bool = False  # needs data never sent before (uploads, creates)
    dup: bool = False  # warm-up and measurement send the same batch: all duplicates
    max_connections: int | None = None  # more would only queue (bcrypt)
    min_seconds: float = 0  # runs so slow that a shorter one counts too few requests


SCENARIOS = [
    Scenario("auth_me", "GET /auth/me (framework floor)", "get.lua"),
    Scenario(
        "login", "POST /auth/login (bcrypt cost 12)", "login.lua", max_connections=8, min_seconds=6
    ),
    Scenario("contacts_page", "GET /contacts?page=random", "get.lua"),
    Scenario("contacts_search", "GET /contacts/search?q=3 letters", "get.lua"),
    Scenario("contact_get", "GET /contacts/{id}", "get.lua"),
    Scenario("contacts_changes", "GET /contacts/changes walk (limit 200)", "get.lua"),
    Scenario("calls_first", "GET /calls first page", "get.lua"),
    Scenario("calls_deep", "GET /calls deep keyset page", "get.lua"),
    Scenario("call_history", "GET /calls/{contact_id}", "get.lua"),
    Scenario("upload_100_new", "POST /calls 100 new", "upload.lua", "call", 100, True),
    Scenario("upload_100_dup", "POST /calls 100 duplicates", "upload.lua", "call", 100, True, True),
    Scenario("upload_1000_new", "POST /calls 1000 new", "upload.lua", "call", 1000, True),
    Scenario(
        "upload_1000_dup", "POST /calls 1000 duplicates", "upload.lua", "call", 1000, True, True
    ),
    Scenario("contact_create", "POST /contacts (new number)", "create.lua", "req", 1, True),
    Scenario("sync", "POST /sync 50 contacts + 200 calls", "sync.lua", "req", 1, True),
]
BY_NAME = {s.name: s for s in SCENARIOS}
READS = {"auth_me", "contacts_page", "contacts_search", "contact_get", "contacts_changes"} | {
    "calls_first",
    "calls_deep",
    "call_history",
}


def get_json(client: httpx.Client, path: str) -> Any:
    response = client.get(path)
    if response.status_code != 200:
        raise BenchError(f"GET {path}: {response.status_code} {response.text[:300]}")
    return orjson.loads(response.content)


def walk(client: httpx.Client, first: str, max_pages: int) -> tuple[list[str], list[Any]]:
    """Follow next_cursor from `first`; the paths of every page and every item seen."""
    paths, items, path = [first], [], first
    sep = "&" if "?" in first else "?"
    for _ in range(max_pages):
        page = get_json(client, path)
        items.extend(page["items"])
        cursor = page.get("next_cursor")
        if not cursor or page.get("has_more") is False:
            break
        path = f"{first}{sep}cursor={quote(cursor, safe='')}"
        paths.append(path)
    return paths, items


@dataclass
class Target:
    """One seeded server as the load scripts see it."""

    name: str
    base_url: str
    token: str  # a non-admin user's
    files: Path
    session: int = 0  # the server's session id (its process group leader's pid)
    epoch: int = 0
    first_syncs: int = 0

    def next_epoch(self) -> int:
        self.epoch += 1
        if self.epoch >= 100:
            raise BenchError("out of upload epochs (see bench/lua/common.lua)")
        return self.epoch

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, timeout=120, headers={"Authorization": f"Bearer {self.token}"}
        )


def write_files(target: Target, data: DataSet, emails: list[str]) -> dict[str, int]:
    """The paths and data each scenario picks from, for this server's ids and cursors;
    checks on the way that each walk sees every row once."""
    rng = random.Random(11)
    files = target.files
    files.mkdir(parents=True, exist_ok=True)

    def put(name: str, lines: list[str]) -> None:
        (files / name).write_text("\n".join(lines) + "\n")

    with target.client() as client:
        _, contacts = walk(client, "/contacts?limit=200", 1000)
        ids = [c["id"] for c in contacts]
        if len(set(ids)) != len(ids) or len(ids) != data.contacts:
            raise BenchError(f"{target.name}: contacts walk saw {len(ids)} rows")
        sample = rng.sample(ids, min(2000, len(ids)))
        pages = -(-len(ids) // 50)
        put("contacts_page", [f"/contacts?page={p}&limit=50" for p in range(1, pages + 1)])
        put("contact_get", [f"/contacts/{i}" for i in sample])
        put("call_history", [f"/calls/{i}" for i in sample])
        put("contacts_search", [f"/contacts/search?q={quote(f)}" for f in fragments(data)])
        changes, changed = walk(client, "/contacts/changes?limit=200", 1000)
        if len(changed) != len({c["id"] for c in changed}) or len(changed) < data.contacts:
            raise BenchError(f"{target.name}: changes walk saw {len(changed)} rows")
        put("contacts_changes", changes)
        put("calls_first", ["/calls"])
        walked, _ = walk(client, "/calls?limit=200", MAX_WALK_PAGES)
        deep = [p.replace("limit=200", "limit=50") for p in walked[len(walked) // 2 :]]
        put("calls_deep", deep or ["/calls"])
        put("auth_me", ["/auth/me"])
        put("user_id", [get_json(client, "/auth/me")["id"]])
        state = client.get("/sync/state")
        cursor = state.json().get("contacts_cursor") if state.status_code == 200 else None
        (files / "sync_cursor").write_text(cursor or "")
    put("login", [f"{e} {PASSWORD}" for e in emails])
    put("phones", [f"+1 {p[2:5]}-{p[5:8]}-{p[8:]}" for p in data.phones[:5000]])
    return {"changes_pages": len(changes), "calls_walked_pages": len(walked)}


def fragments(data: DataSet, count: int = 200) -> list[str]:
    rng = random.Random(5)
    seen: dict[str, None] = {}
    names = [c["name"] for c in data.contact_items]
    for _ in range(count * 50):
        if len(seen) == count:
            break
        word = rng.choice(rng.choice(names).split())
        if len(word) >= 3 and word.isalpha():
            start = rng.randint(0, len(word) - 3)
            seen[word[start : start + 3].lower()] = None
    return list(seen)


def wrk_args(s: Scenario, target: Target, epoch: int) -> list[str]:
    f = target.files
    if s.script == "get.lua":
        return [
            target.token,
            str(f / s.name),
            "cycle" if s.name == "contacts_changes" else "random",
        ]
    if s.script == "login.lua":
        return [str(f / "login")]
    if s.script == "upload.lua":
        mode = "dup" if s.dup else "new"
        return [target.token, str(s.per_request), mode, str(epoch), str(f / "phones")]
    if s.script == "create.lua":
        return [target.token, str(epoch)]
    if s.script == "sync.lua":
        return [target.token, str(epoch), (f / "sync_cursor").read_text().strip()]
    raise ValueError(s.script)


_probes = 0


def probe(s: Scenario, target: Target) -> str | None:
    """One request like the scenario's; None when it answers 2xx, else why not."""
    global _probes
    _probes += 1
    when = datetime(2013, 1, 1, tzinfo=UTC) + timedelta(seconds=_probes)
    call = {"direction": "incoming", "duration_seconds": 5, "timestamp": when.isoformat()}
    contact = {"name": f"Probe {_probes}", "phone_raw": f"+1 907-{200 + _probes}-{_probes:04d}"}
    try:
        with target.client() as client:
            if s.script == "get.lua":
                path = (target.files / s.name).read_text().split("\n")[0]
                response = client.get(path)
            elif s.script == "login.lua":
                response = client.post(
                    "/auth/login", json={"email": "user1@bench.example", "password": PASSWORD}
                )
            elif s.script == "upload.lua":
                response = client.post("/calls", json=[call])
            elif s.script == "create.lua":
                response = client.post("/contacts", json=contact)
            else:
                response = client.post("/sync", json={"contacts": [contact], "calls": [call]})
    except httpx.HTTPError as exc:
        return f"no answer: {exc!r}"
    if 200 <= response.status_code < 300:
        return None
    return f"{response.status_code} {response.text[:200]}"


_BENCH_JSON = re.compile(r"^BENCH_JSON (\{.*\})$", re.MULTILINE)


def run_wrk(
    procs: Processes,
    s: Scenario,
    target: Target,
    *,
    seconds: float,
    connections: int,
    epoch: int,
) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(LUA_DIR / s.script),
        target.base_url,
        "--",
        *wrk_args(s, target, epoch),
    ]
    env = {"BENCH_LUA_DIR": str(LUA_DIR), "PATH": "/usr/bin:/bin"}
    split: list[int] = []
    sampler = threading.Timer(
        0.75 * seconds, lambda: split.extend(connections_per_process(target.base_url))
    )
    sampler.start()
    done = procs.run(f"wrk {s.name}", argv, timeout=seconds + 90, env=env)
    sampler.cancel()
    sampler.join()
    match = _BENCH_JSON.search(done.stdout)
    if done.returncode != 0 or not match:
        raise BenchError(f"wrk {s.name} failed ({done.returncode}): {done.stderr[-1000:]}")
    raw = orjson.loads(match.group(1))
    secs = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / secs,
        "units_per_s": raw["requests"] * s.per_request / secs,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "non_2xx": raw["status_errors"],
        "socket_errors": errors,
        "connections_split": split,
    }


def connections_per_process(base_url: str) -> list[int]:
    """The server's established connections counted by the process holding them, most
    first: how wrk's connections are split over the workers at that moment."""
    port = urlsplit(base_url).port
    try:
        listed = subprocess.run(
            ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:  # no ss (iproute2): not counted
        return []
    return sorted(Counter(re.findall(r"pid=(\d+)", listed)).values(), reverse=True)


async def _first_sync(target: Target, data: DataSet) -> dict[str, Any]:
    contacts, calls = data.first_sync(target.first_syncs)
    target.first_syncs += 1
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}
    requests = 0
    async with httpx.AsyncClient(base_url=target.base_url, timeout=300, headers=headers) as client:

        async def call(method: str, path: str, body: Any = None) -> Any:
            nonlocal requests
            requests += 1
            content = orjson.dumps(body) if body is not None else None
            response = await client.request(method, path, content=content)
            if response.status_code not in (200, 201):
                raise BenchError(f"first sync {method} {path}: {response.status_code}")
            return orjson.loads(response.content)

        started = time.perf_counter()
        await call("GET", "/sync/state")
        for i in range(0, len(contacts), 1000):
            await call("POST", "/contacts/batch", contacts[i : i + 1000])
        inserted = 0
        for i in range(0, len(calls), 5000):
            inserted += (await call("POST", "/calls", calls[i : i + 5000]))["inserted"]
        pulled, path = 0, "/contacts/changes?limit=200"
        for _ in range(2000):
            page = await call("GET", path)
            pulled += len(page["items"])
            if not page["has_more"]:
                break
            path = f"/contacts/changes?limit=200&cursor={quote(page['next_cursor'], safe='')}"
        seconds = time.perf_counter() - started
    if inserted != len(calls):
        raise BenchError(f"first sync on {target.name}: {inserted} calls inserted of {len(calls)}")
    return {"seconds": seconds, "requests": requests, "pulled": pulled, "inserted": inserted}


def first_sync(target: Target, data: DataSet) -> dict[str, Any]:
    """A phone holding 5,000 contacts and 30,000 calls syncs for the first time: state,
    contact batches of 1000, call batches of 5000, then the whole changes feed; wall time."""
    try:
        return asyncio.run(_first_sync(target, data))
    except httpx.HTTPError as exc:
        raise BenchError(f"first sync on {target.name}: {exc!r}") from None

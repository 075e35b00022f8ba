"""The seeded data set, generated deterministically so both servers get the very same
requests, and the seeding of one server through its HTTP API."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from procs import BenchError, log

PASSWORD = "bench-pass-123456"  # noqa: S105 - throwaway accounts of a scratch database
ADMIN_EMAIL = "admin@bench.example"
CONTACT_BATCH = 1000
CALL_BATCH = 1000


def _words(text: str) -> list[str]:
    return text.split()


FIRST = _words(
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara "
    "Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy "
    "Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily "
    "Andrew Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Dorothy George Melissa "
    "Timothy Deborah Ronald Stephanie Jason Rebecca Edward Sharon Jeffrey Laura Ryan Cynthia "
    "Jacob Kathleen Gary Amy Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry "
    "Pamela Justin Emma Scott Nicole Brandon Helen Benjamin Samantha Samuel Katherine Gregory "
    "Christine Alexander Debra Frank Rachel Patrick Carolyn Raymond Janet Jack Catherine "
    "Dennis Maria Jerry Heather Tyler Diane Aaron Ruth Jose Julie Adam Olivia Nathan Joyce "
    "Henry Virginia Douglas Victoria Zachary Kelly Peter Lauren Kyle Christina Ethan Joan "
    "Walter Evelyn Noah Judith Jeremy Megan Christian Andrea Keith Cheryl Roger Hannah Terry "
    "Jacqueline Gerald Martha Harold Gloria Sean Teresa Austin Ann Carl Sara Arthur Madison"
)
LAST = _words(
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White "
    "Harris Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres "
    "Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts "
    "Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris "
    "Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly "
    "Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Wood James Bennett Gray "
    "Mendoza Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers Long Ross Foster Jimenez "
    "Powell Jenkins Perry Russell Sullivan Bell Coleman Butler Henderson Barnes Gonzales "
    "Fisher Vasquez Simmons Romero Jordan Patterson Alexander Hamilton Graham Reynolds Griffin"
)
COMPANIES = _words("Acme Globex Initech Umbrella Stark Wayne Hooli Vandelay Soylent Tyrell")
SEED_AREAS = (201, 212, 213, 305, 310, 312, 404, 415, 503, 512, 602, 617, 646, 702, 713, 718)
UNKNOWN_AREAS = (773, 818, 917, 925)  # numbers that call but are nobody's contact
FIRST_SYNC_AREAS = (480, 520, 928, 619)  # the phone's own new contacts
SHORT_CODES = ("911", "*123#", "611", "22395", "#31#")
DIRECTIONS = ("incoming", "outgoing", "missed")
SPELLINGS = ("({a}) {e}-{l}", "+1 {a}-{e}-{l}", "{a}.{e}.{l}", "{a}{e}{l}", "+1{a}{e}{l}")


def rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def spelled(e164: str, rng: random.Random) -> str:
    a, e, line = e164[2:5], e164[5:8], e164[8:]
    return rng.choice(SPELLINGS).format(a=a, e=e, l=line)


def random_numbers(rng: random.Random, count: int, areas: tuple[int, ...]) -> list[str]:
    numbers: dict[str, None] = {}
    for _ in range(count * 20):
        if len(numbers) == count:
            break
        area, ex, line = rng.choice(areas), rng.randint(200, 999), rng.randint(0, 9999)
        numbers[f"+1{area}{ex}{line:04d}"] = None
    return list(numbers)


def person(rng: random.Random, i: int) -> str:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    return f"{name} ({rng.choice(COMPANIES)})" if i % 7 == 0 else name


@dataclass
class DataSet:
    """Everything that is sent to both servers; calls are generated per batch, on demand."""

    users: int
    contacts: int
    calls: int
    seed: int = 7
    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.phones = random_numbers(rng, self.contacts, SEED_AREAS)
        if len(self.phones) != self.contacts:
            raise BenchError("could not draw enough distinct phone numbers")
        self.unknown = random_numbers(rng, 2000, UNKNOWN_AREAS)
        oldest = self.now - timedelta(days=2000)
        self.contact_items = [
            {
                "name": person(rng, i),
                "phone_raw": spelled(phone, rng),
                "created_at": rfc3339(oldest + timedelta(seconds=rng.randint(0, 1500 * 86400))),
            }
            for i, phone in enumerate(self.phones)
        ]
        # Calls span the year that ends 10 minutes ago, one slot per call: all distinct.
        self.calls_start = self.now - timedelta(days=365)
        self.call_step_us = (365 * 86400 - 600) * 1_000_000 // max(self.calls, 1)

    def user_emails(self) -> list[str]:
        return [ADMIN_EMAIL] + [f"user{i}@bench.example" for i in range(1, self.users)]

    def contact_batches(self) -> list[list[dict[str, Any]]]:
        items = self.contact_items
        return [items[i : i + CONTACT_BATCH] for i in range(0, len(items), CONTACT_BATCH)]

    def call_batch_count(self) -> int:
        return -(-self.calls // CALL_BATCH)

    def call_batch(self, b: int) -> list[dict[str, Any]]:
        rng = random.Random(self.seed * 1_000_003 + b)
        out = []
        for k in range(b * CALL_BATCH, min((b + 1) * CALL_BATCH, self.calls)):
            us = k * self.call_step_us + rng.randint(0, self.call_step_us // 2)
            direction = rng.choice(DIRECTIONS)
            call: dict[str, Any] = {
                "direction": direction,
                "duration_seconds": 0 if direction == "missed" else rng.randint(1, 3600),
                "timestamp": rfc3339(self.calls_start + timedelta(microseconds=us)),
            }
            r = rng.random()
            if r < 0.80:
                call["phone_raw"] = spelled(rng.choice(self.phones), rng)
            elif r < 0.90:
                call["phone_normalized"] = rng.choice(self.unknown)
            elif r < 0.95:
                call["phone_raw"] = rng.choice(SHORT_CODES)
            # else: a withheld number, no phone at all
            out.append(call)
        return out

    def first_sync(self, repetition: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A phone's first sync: 5,000 contacts (half the team already has, some of them
        older on the phone), 30,000 calls of its numbers; new data for every repetition."""
        rng = random.Random(self.seed * 7919 + repetition)
        shared = rng.sample(self.phones, min(2500, len(self.phones)))
        own = random_numbers(rng, 5000 - len(shared), FIRST_SYNC_AREAS)
        contacts: list[dict[str, Any]] = []
        for e164 in [*shared, *own]:
            age = timedelta(days=rng.randint(0, 2500))
            contacts.append(
                {
                    "name": person(rng, len(contacts)),
                    "phone_raw": spelled(e164, rng),
                    "created_at": rfc3339(self.now - age),
                }
            )
        numbers = [*shared, *own]
        # Times of repetition r: 2014, one second apart (uploads from Lua use 2015 on).
        start = datetime(2014, 1, 1, tzinfo=UTC) + timedelta(seconds=40_000 * repetition)
        calls = []
        for k in range(30_000):
            direction = rng.choice(DIRECTIONS)
            calls.append(
                {
                    "direction": direction,
                    "duration_seconds": 0 if direction == "missed" else rng.randint(1, 1800),
                    "timestamp": rfc3339(start + timedelta(seconds=k)),
                    "phone_raw": spelled(rng.choice(numbers), rng),
                }
            )
        return contacts, calls


@dataclass
class Seeded:
    """What the load scripts need from one seeded server."""

    tokens: dict[str, str]  # email -> token
    seconds: float
    contacts_per_second: float
    calls_per_second: float


async def _post(client: httpx.AsyncClient, path: str, token: str, body: Any) -> Any:
    response = await client.post(
        path,
        content=orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    if response.status_code not in (200, 201):
        raise BenchError(f"POST {path}: {response.status_code} {response.text[:500]}")
    return orjson.loads(response.content)


async def login(client: httpx.AsyncClient, email: str) -> str:
    response = await client.post("/auth/login", json={"email": email, "password": PASSWORD})
    if response.status_code != 200:
        raise BenchError(f"login {email}: {response.status_code} {response.text[:300]}")
    token: str = response.json()["token"]
    return token


async def _bounded(concurrency: int, jobs: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Any) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs))


async def seed_server(name: str, base_url: str, data: DataSet) -> Seeded:
    """Users, contacts (POST /contacts/batch) and calls (POST /calls), checking every answer."""
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        started = time.monotonic()
        emails = data.user_emails()
        admin = await login(client, ADMIN_EMAIL)
        for i, email in enumerate(emails[1:], start=1):
            body = {"name": f"Bench User {i}", "email": email, "password": PASSWORD}
            await _post(client, "/users", admin, body)
        tokens = dict(
            zip(emails, await asyncio.gather(*(login(client, e) for e in emails)), strict=True)
        )
        users = list(tokens.values())

        t = time.monotonic()
        batches = data.contact_batches()
        answers = await _bounded(
            2,
            [
                _post(client, "/contacts/batch", users[i % len(users)], batch)
                for i, batch in enumerate(batches)
            ],
        )
        created = sum(1 for a in answers for r in a["results"] if r["result"] == "created")
        if created != data.contacts:
            raise BenchError(f"{name}: {created} contacts created, expected {data.contacts}")
        contacts_rate = data.contacts / (time.monotonic() - t)
        log(f"{name}: {data.contacts} contacts in {time.monotonic() - t:.1f} s")

        t = time.monotonic()
        inserted = duplicates = rejected = 0
        count = data.call_batch_count()
        for first in range(0, count, 16):  # a few batches in flight, memory stays small
            chunk = range(first, min(first + 16, count))
            answers = await _bounded(
                3,
                [_post(client, "/calls", users[b % len(users)], data.call_batch(b)) for b in chunk],
            )
            for a in answers:
                inserted += a["inserted"]
                duplicates += a["duplicates"]
                rejected += len(a["rejected"])
        if (inserted, duplicates, rejected) != (data.calls, 0, 0):
            raise BenchError(
                f"{name}: calls inserted={inserted} duplicates={duplicates} rejected={rejected}, "
                f"expected {data.calls} inserted"
            )
        calls_rate = data.calls / (time.monotonic() - t)
        log(f"{name}: {data.calls} calls in {time.monotonic() - t:.1f} s")
        return Seeded(tokens, time.monotonic() - started, contacts_rate, calls_rate)


def verify_counts(pg: Any, database: str, data: DataSet) -> dict[str, int]:
    """The rows PostgreSQL holds after seeding; raises when they are not the expected ones."""
    (users, contacts, calls, linked, syncs) = pg.execute(
        database,
        "SELECT count(*) FROM users WHERE deleted_at IS NULL",
        "SELECT count(*) FROM contacts WHERE NOT deleted",
        "SELECT count(*) FROM call_logs",
        "SELECT count(*) FROM call_logs WHERE contact_id IS NOT NULL",
        "SELECT count(*) FROM sync_audit",
    )
    counts = {
        "users": users[0][0],
        "contacts": contacts[0][0],
        "calls": calls[0][0],
        "linked_calls": linked[0][0],
        "sync_records": syncs[0][0],
    }
    expected = {"users": data.users, "contacts": data.contacts, "calls": data.calls}
    wrong = {k: (counts[k], v) for k, v in expected.items() if counts[k] != v}
    if wrong:
        raise BenchError(f"{database}: (found, expected) rows: {wrong}")
    return counts

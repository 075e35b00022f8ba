"""Uploads: the batch body every upload sends, and the sync record each one writes in the
request's transaction, beside what it stored."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from crmsync.calls.schemas import MAX_CALLS
from crmsync.calls.service import CallBatch, call_count_metrics, call_insert_many
from crmsync.contacts.schemas import MAX_BATCH
from crmsync.contacts.service import Feed, contact_changes_page
from crmsync.contacts.upsert import ContactBatch, contact_count_metrics, contact_upsert_many
from crmsync.db import Connection, delete_in_batches
from crmsync.errors import BadRequest, Loc, PayloadTooLarge, ValidationFailed
from crmsync.idempotency import Answer, idempotent
from crmsync.pagination import (
    Listing,
    PageRequest,
    Shape,
    SortKey,
    json_object_sql,
    kept_total,
    paginate,
)

SyncKind = Literal["contacts", "calls", "sync"]


@dataclass(frozen=True)
class Upload:
    """What an upload's work did: its sync record's counts and details, its answer (given
    the record's id) and the metrics it counts once the work has really run."""

    synced_contacts: int
    synced_calls: int
    details: dict[str, int]  # counts only (the contract's `details`)
    answer: Callable[[uuid.UUID], bytes]
    count_metrics: Callable[[], None]
    # Its sync record, when the work wrote it in the statement that stored the batch: an
    # upload outside a transaction is that one statement (db.upload_transaction).
    sync_id: uuid.UUID | None = None


# JSON values (keys counted) one batch item may hold: a call is 15, a contact 9; the rest
# is room for fields an app adds, which are ignored.
VALUES_PER_ITEM = 40
# A JSON string, ended by its closing quote or by the end of the body; possessive, so that
# no body makes the search backtrack.
_STRING = re.compile(rb'(?s)"(?>[^"\\]++|\\.?)*+(?:"|\Z)')


def parse_json(body: bytes, *, max_items: int) -> Any:
    """An upload's body: 422 when there is none, 400 when it is not strict JSON, 413 when it
    holds more JSON values than max_items items may, found before it is parsed: 16 MiB of
    `{},` would otherwise become 5.6 million Python objects (2 GB) before batch_items could
    count them."""
    if not body.strip():
        raise ValidationFailed.one(["body"], "Field required", "missing")
    _values_within(body, max_items * VALUES_PER_ITEM + 64, max_items)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("Malformed JSON body") from None


def _values_within(body: bytes, limit: int, max_items: int) -> None:
    """Each JSON value but the first follows a comma, a colon or an opening bracket, and
    takes at least two bytes with its separator: a body of up to 2 * limit bytes (every
    usual upload) holds at most limit values. A bigger one has its separators counted,
    those in strings too at first; when that is over the limit, the strings' own are taken
    off one string at a time, stopping at the limit's count of strings (each is a key or a
    value itself)."""
    if len(body) <= 2 * limit:
        return

    def separators(text: bytes) -> int:
        return sum(text.count(c) for c in (b",", b":", b"[", b"{"))

    outside_strings = separators(body)
    if outside_strings <= limit:
        return
    too_many = PayloadTooLarge(f"More JSON values than {max_items} items may hold")
    for count, string in enumerate(_STRING.finditer(body), 1):
        if count > limit:
            raise too_many
        outside_strings -= separators(string.group())
    if outside_strings > limit:
        raise too_many


def batch_items(
    value: object, *, loc: Loc, max_items: int, allow_empty: bool = False
) -> list[object]:
    """The list a batch upload sends: 422 when it is not a list (or empty), 413 when it
    holds more than max_items."""
    if not isinstance(value, list):
        raise ValidationFailed.one(loc, "Input should be a valid list", "list_type")
    if not value and not allow_empty:
        raise ValidationFailed.one(loc, "List should have at least 1 item", "too_short")
    if len(value) > max_items:
        raise PayloadTooLarge(f"At most {max_items} items in one batch, got {len(value)}")
    return value


@dataclass(frozen=True)
class Uploaded:
    status: int
    body: bytes
    # The answer stored for an earlier request with the same Idempotency-Key: as of then.
    replayed: bool

    @property
    def headers(self) -> dict[str, str] | None:
        """Says a replay, so that the app pulls what changed since the first answer."""
        return {"Idempotent-Replayed": "true"} if self.replayed else None


async def upload(
    conn: Connection,
    *,
    user_id: uuid.UUID,
    kind: SyncKind,
    key: str | None,
    device_id: str | None,
    request: tuple[str, str, bytes],
    work: Callable[[], Awaitable[Upload]],
) -> Uploaded:
    """How every upload (POST /contacts/batch, /calls, /sync) runs, in the request's
    transaction: `work` stores the batch, one sync record is written beside it (unless the
    work's own statement wrote it), and the answer is kept under the Idempotency-Key. A
    repeat of the key gets the first answer and runs nothing: no second record, nothing
    counted twice. POST /calls without a key runs outside a transaction, as the one
    statement that stores its batch and writes its record."""
    done: list[Upload] = []

    async def produce() -> Answer:
        started = time.perf_counter()
        result = await work()
        sync_id = result.sync_id
        if sync_id is None:
            # A second statement: the work's and this one must commit together.
            assert conn.is_in_transaction(), "an upload outside a transaction is one statement"
            sync_id = await _sync_record_create(
                conn,
                user_id=user_id,
                kind=kind,
                synced_contacts=result.synced_contacts,
                synced_calls=result.synced_calls,
                details=result.details,
                device_id=device_id or None,  # an empty X-Device-Id is none
                elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
            )
        done.append(result)
        return 200, result.answer(sync_id)

    status, body = await idempotent(
        conn, user_id=user_id, key=key, request=request, produce=produce
    )
    for result in done:  # none when the answer was a stored one
        result.count_metrics()
    return Uploaded(status, body, replayed=not done)


CHANGES_LIMIT = 200  # contact changes in one POST /sync answer


async def sync_work(
    conn: Connection,
    body: bytes,
    *,
    user_id: uuid.UUID,
    is_admin: bool,
    region: str,
    feed: Feed,
) -> Upload:
    """POST /sync's work: its contacts stored as by POST /contacts/batch, its calls as by
    POST /calls, then the contact changes after its cursor (which see those writes)."""
    payload = parse_json(body, max_items=MAX_BATCH + MAX_CALLS)
    if not isinstance(payload, dict):
        raise ValidationFailed.one(["body"], "Input should be a valid object", "dict_type")
    cursor = payload.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise ValidationFailed.one(
            ["body", "cursor"], "Input should be a valid string", "string_type"
        )
    contact_items = _optional_batch(payload, "contacts", MAX_BATCH)
    call_items = _optional_batch(payload, "calls", MAX_CALLS)
    contacts = (
        await contact_upsert_many(
            conn, contact_items, user_id=user_id, region=region, loc=("body", "contacts")
        )
        if contact_items
        else ContactBatch(
            results_json="[]", counts={"created": 0, "replaced": 0, "existing": 0, "rejected": 0}
        )
    )
    calls = (
        await call_insert_many(
            conn,
            call_items,
            user_id=user_id,
            is_admin=is_admin,
            region=region,
            loc=("body", "calls"),
        )
        if call_items
        else CallBatch(inserted=0, duplicates=0, rejected=0, rejected_json="[]")
    )
    changes = await contact_changes_page(conn, cursor=cursor, limit=CHANGES_LIMIT, feed=feed)
    counts = contacts.counts

    def answer(sync_id: uuid.UUID) -> bytes:
        head = (
            f'{{"sync_id":"{sync_id}","contacts":{contacts.results_json},'
            f'"calls":{{"inserted":{calls.inserted},"duplicates":{calls.duplicates},'
            f'"rejected":{calls.rejected_json}}},"changes":'
        )
        return head.encode() + changes.json() + b"}"

    def count_metrics() -> None:
        contact_count_metrics(counts)
        call_count_metrics(calls)

    return Upload(
        synced_contacts=counts["created"] + counts["replaced"],
        synced_calls=calls.inserted,
        details={
            **counts,
            "inserted": calls.inserted,
            "duplicates": calls.duplicates,
            "rejected_calls": calls.rejected,
        },
        answer=answer,
        count_metrics=count_metrics,
    )


def _optional_batch(payload: dict[str, Any], field: str, max_items: int) -> list[object]:
    value = payload.get(field)
    if value is None:
        return []
    return batch_items(value, loc=("body", field), max_items=max_items, allow_empty=True)


async def _sync_record_create(
    conn: Connection,
    *,
    user_id: uuid.UUID,
    kind: SyncKind,
    synced_contacts: int,
    synced_calls: int,
    details: dict[str, int],
    device_id: str | None,
    elapsed_ms: float,
) -> uuid.UUID:
    sync_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO sync_audit
               (user_id, kind, synced_contacts, synced_calls, details, device_id, elapsed_ms)
           VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7) RETURNING id""",
        user_id,
        kind,
        synced_contacts,
        synced_calls,
        orjson.dumps(details).decode(),
        device_id,
        elapsed_ms,
    )
    return sync_id


async def sync_record_prune(conn: Connection, *, retention_days: int) -> int:
    """Delete the sync records older than `retention_days` (CRMSYNC_SYNC_RECORD_RETENTION_DAYS)
    but each user's newest, which GET /sync/state answers as last_sync_at. Outside a
    transaction: each batch commits. How many were deleted."""
    return await delete_in_batches(
        conn,
        "sync_audit",
        "t.created_at < now() - make_interval(days => $1) AND EXISTS ("
        "SELECT FROM sync_audit n WHERE n.user_id = t.user_id"
        " AND (n.created_at, n.id) > (t.created_at, t.id))",
        retention_days,
        oldest_first="t.created_at",
    )


SYNC = Shape(
    (
        ("id", "s.id::text"),
        ("user_id", "s.user_id::text"),
        ("synced_contacts", "s.synced_contacts"),
        ("synced_calls", "s.synced_calls"),
        ("created_at", "api_time(s.created_at)"),
        ("kind", "s.kind"),
        ("details", "s.details"),
        ("device_id", "s.device_id"),
        ("elapsed_ms", "s.elapsed_ms"),
    ),
    nested=frozenset({"details"}),
)


async def sync_list(conn: Connection, page: PageRequest, *, user_id: uuid.UUID | None) -> bytes:
    """Sync records newest first (created_at, then id): one user's, or everyone's."""
    listing = Listing(
        scope=f"sync|{user_id or ''}",
        from_sql="FROM sync_audit s",
        shape=SYNC,
        keys=[
            SortKey("s.created_at", "timestamptz", "created_at"),
            SortKey("s.id", "uuid", "id"),
        ],
        where=["s.user_id = $1"] if user_id else [],
        params=[user_id] if user_id else [],
        descending=True,
        total_sql=kept_total("sync", ["user_id = $1"] if user_id else []),
    )
    return await paginate(conn, listing, page)


SYNC_STATE_SQL = (
    "SELECT "
    + json_object_sql(
        [
            ("server_time", "api_time(clock_timestamp())"),
            (
                "last_call_timestamp",
                '(SELECT api_time(max("timestamp")) FROM call_logs WHERE user_id = $1)',
            ),
            (
                "last_sync_at",
                "(SELECT api_time(max(created_at)) FROM sync_audit WHERE user_id = $1)",
            ),
            ("contacts_cursor", "$2::text"),
        ]
    )
    + "::text"
)


async def sync_state(conn: Connection, *, user_id: uuid.UUID, contacts_cursor: str | None) -> str:
    """Where the user's next upload and pull start, as the JSON of GET /sync/state."""
    state: str = await conn.fetchval(SYNC_STATE_SQL, user_id, contacts_cursor)
    return state

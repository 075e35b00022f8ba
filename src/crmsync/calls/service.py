"""Call logs: set-based batch upload with dedupe and contact linking, and the call lists."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from crmsync.calls.schemas import BATCH_ADAPTER, CALL_ADAPTER, CallIn
from crmsync.db import Connection
from crmsync.errors import (
    Forbidden,
    Loc,
    NotFound,
    item_problems,
)
from crmsync.observability import CALL_RESULTS
from crmsync.pagination import (
    Listing,
    PageRequest,
    Shape,
    SortKey,
    is_empty_page,
    kept_total,
    paginate,
)
from crmsync.phone import normalize_with_hint, raw_or_hint
from crmsync.times import FUTURE_SKEW

CALL = Shape(
    (
        ("id", "l.id::text"),
        ("user_id", "l.user_id::text"),
        ("contact_id", "l.contact_id::text"),
        ("contact_name", "c.name"),
        ("phone_raw", "l.phone_raw"),
        ("phone_normalized", "l.phone_normalized"),
        ("direction", "l.direction"),
        ("duration_seconds", "l.duration_seconds"),
        ("timestamp", 'api_time(l."timestamp")'),
    )
)

# One statement for the whole batch. Calls already stored are dropped first, one probe per
# call: a phone re-sends much of its log, and a call that never reaches the INSERT costs
# neither its contact lookup nor a speculative insertion (100 stored calls: 1.85x the
# batches/s in pgbench, 100 new ones ~6% fewer; bench/NOTES.md). What the probe cannot see
# (a call stored meanwhile by a concurrent upload, a repeat inside the batch) the dedupe
# index turns into a no-op. Calls without a contact_id are linked to the live contact of
# their number right here, one probe of uq_contacts_phone_normalized per call (a subquery,
# so the planner never hashes the whole contacts table for a batch). Rows go in in
# dedupe-key order, so concurrent uploads of overlapping batches wait on each other's keys
# in one order and never deadlock. Within a key, request order: the first of repeats is
# the one kept.
_INSERT_CTE = """
WITH ins AS (
    INSERT INTO call_logs AS l
        (user_id, contact_id, phone_raw, phone_normalized, direction, duration_seconds,
         "timestamp")
    SELECT i.user_id,
           coalesce(i.contact_id, (SELECT c.id FROM contacts c
                                   WHERE c.phone_normalized = i.phone_normalized
                                     AND NOT c.deleted)),
           i.phone_raw, i.phone_normalized, i.direction, i.duration_seconds, i."timestamp"
    FROM ROWS FROM (json_to_recordset($1::json)
         AS (user_id uuid, contact_id uuid, phone_raw text, phone_normalized text,
             direction text, duration_seconds int, "timestamp" timestamptz)) WITH ORDINALITY
         AS i(user_id, contact_id, phone_raw, phone_normalized, direction, duration_seconds,
              "timestamp", n)
    WHERE NOT EXISTS (
        SELECT FROM call_logs o
        WHERE o.user_id = i.user_id AND o."timestamp" = i."timestamp"
          AND coalesce(o.phone_normalized, o.phone_raw, '')
              = coalesce(i.phone_normalized, i.phone_raw, '')
          AND o.direction = i.direction)
    ORDER BY i.user_id, i."timestamp", coalesce(i.phone_normalized, i.phone_raw, ''), i.direction,
             i.n
    ON CONFLICT (user_id, "timestamp", coalesce(phone_normalized, phone_raw, ''), direction)
        DO NOTHING
    RETURNING 1
)"""
INSERT_SQL = _INSERT_CTE + "\nSELECT count(*) FROM ins"

# The same INSERT writing the upload's sync record too (POST /calls): without an
# Idempotency-Key the whole upload is this one statement, outside a transaction
# (db.upload_transaction). $2 the uploader, $3 the device id, $4 the calls sent to the
# INSERT, $5 the rejected ones, $6 the milliseconds the upload took before the statement.
INSERT_RECORDED_SQL = (
    _INSERT_CTE
    + """, counted AS (
    SELECT count(*)::int AS inserted FROM ins
), record AS (
    INSERT INTO sync_audit
        (user_id, kind, synced_contacts, synced_calls, details, device_id, elapsed_ms)
    SELECT $2::uuid, 'calls', 0, inserted,
           jsonb_build_object('inserted', inserted, 'duplicates', $4::int - inserted,
                              'rejected', $5::int),
           $3::text,
           round(($6::float8 + 1000 * extract(epoch FROM clock_timestamp() - statement_timestamp()))
                 ::numeric, 1)
    FROM counted
    RETURNING id
)
SELECT record.id, counted.inserted FROM record, counted"""
)

KNOWN_IDS_SQL = """
SELECT (SELECT coalesce(array_agg(id), '{}') FROM users
         WHERE id = ANY($1::uuid[]) AND deleted_at IS NULL) AS users,
       (SELECT coalesce(array_agg(id), '{}') FROM contacts
         WHERE id = ANY($2::uuid[])) AS contacts"""


@dataclass(frozen=True)
class CallBatch:
    inserted: int
    duplicates: int  # valid calls not stored: already there, or repeated in the batch
    rejected: int
    rejected_json: str  # JSON array text: [{"index", "errors": [{"loc", "msg", "type"}]}]
    sync_id: uuid.UUID | None = None  # the sync record the INSERT wrote, given a SyncRecord


@dataclass(frozen=True)
class SyncRecord:
    """The upload's sync record, for the calls INSERT to write in the same statement."""

    device_id: str | None
    started: float  # time.perf_counter() as the upload began


# Calls left unlinked by a race: uploaded while their number's contact was being created
# (or given that number, or revived) in another transaction, neither saw the other's rows.
# The maintenance task relinks them; the partial index ix_call_logs_unlinked_phone holds
# exactly the candidate calls. Looking at every contact would be O(contacts + unlinked
# calls): 3 s a round at 2M contacts and 1M unlinked calls, past the 30 s statement timeout
# at ten times that. So a round looks only at the contacts written since the xmin of a mark
# (migration 0008) taken a window before the previous round: any raced pair whose contact
# was written earlier had both transactions finished before the previous round, which
# linked it. Two windows:
# - QUICK_RELINK_WINDOW, every round (5 s): finds the pairs of transactions shorter than
#   10 s, all but the rarest, within seconds;
# - RELINK_WINDOW, every minute (the full round): an hour, longer than any transaction here
#   can last (statements time out at 30 s, idle transactions at 60 s).
# With no mark that old (a new database, or marks lost) the round looks at every contact.
RELINK_WINDOW = timedelta(hours=1)
QUICK_RELINK_WINDOW = timedelta(seconds=10)

RELINK_MARK_SQL = """
WITH previous AS (
    SELECT max(taken_at) AS taken_at FROM relink_marks
), chosen AS (
    SELECT m.taken_at, m.snapshot_xmin FROM relink_marks m, previous p
    WHERE m.taken_at <= p.taken_at - $1::interval
    ORDER BY m.taken_at DESC LIMIT 1
), kept AS (  -- the mark a full round would choose, and those after it
    SELECT max(m.taken_at) AS taken_at FROM relink_marks m, previous p
    WHERE m.taken_at <= p.taken_at - $2::interval
), pruned AS (
    DELETE FROM relink_marks WHERE taken_at < (SELECT taken_at FROM kept)
), marked AS (
    INSERT INTO relink_marks (taken_at, snapshot_xmin)
    VALUES (clock_timestamp(), pg_snapshot_xmin(pg_current_snapshot())::text::bigint)
    ON CONFLICT DO NOTHING
)
SELECT snapshot_xmin FROM chosen"""

RELINK_ALL_SQL = """
UPDATE call_logs l SET contact_id = c.id FROM contacts c
WHERE NOT c.deleted AND l.contact_id IS NULL AND l.phone_normalized IS NOT NULL
  AND l.phone_normalized = c.phone_normalized"""

# Its own statement, not RELINK_ALL_SQL with 0: a prepared statement's cached generic plan
# must not be the whole-table join.
RELINK_SINCE_SQL = """
UPDATE call_logs l SET contact_id = c.id FROM contacts c
WHERE c.change_xid >= $1 AND NOT c.deleted
  AND l.contact_id IS NULL AND l.phone_normalized IS NOT NULL
  AND l.phone_normalized = c.phone_normalized"""


async def call_relink(conn: Connection, *, full: bool) -> int:
    """One relink round, inside the maintenance transaction; the number of calls linked. A
    quick round (not `full`) with no mark to start from leaves the work to a full one."""
    window = RELINK_WINDOW if full else QUICK_RELINK_WINDOW
    since = await conn.fetchval(RELINK_MARK_SQL, window, RELINK_WINDOW)
    if since is None and not full:
        return 0
    if since is None:
        # Every contact: may be long, so no limit in the server, and an hour in the client
        # (whose own limit, past the server's usual one, would cut it off first).
        await conn.execute("SET LOCAL statement_timeout = 0")
        status = await conn.execute(RELINK_ALL_SQL, timeout=3600)
    else:
        status = await conn.execute(RELINK_SINCE_SQL, since)
    return int(status.split()[-1])


def _validate(
    items: Sequence[object], loc: Loc
) -> tuple[list[int] | None, list[CallIn], dict[int, list[dict[str, Any]]]]:
    """(indexes of the valid items or None for "all of them", valid items, errors by index).

    The whole list is validated in one pydantic-core call; only a batch with an invalid
    item is gone through item by item to tell which ones."""
    try:
        calls = BATCH_ADAPTER.validate_python(items)
    except ValidationError:
        pass
    else:
        if not calls or max(c["timestamp"] for c in calls) <= datetime.now(UTC) + FUTURE_SKEW:
            return None, calls, {}
    indexes: list[int] = []
    valid: list[CallIn] = []
    errors: dict[int, list[dict[str, Any]]] = {}
    for index, item in enumerate(items):
        try:
            valid.append(CALL_ADAPTER.validate_python(item))
            indexes.append(index)
        except ValidationError as exc:
            errors[index] = item_problems(exc, (*loc, index))
    return indexes, valid, errors


def _names_other_user(item: object, user_id: uuid.UUID) -> bool:
    """Whether an item (valid or not) names a user_id other than the caller's."""
    named = item.get("user_id") if isinstance(item, dict) else None
    try:
        return named is not None and uuid.UUID(str(named)) != user_id
    except ValueError:
        return False  # not an id at all: a validation error of the item


def _reject(
    errors: dict[int, list[dict[str, Any]]], index: int, loc: list[str | int], msg: str
) -> None:
    errors.setdefault(index, []).append({"loc": loc, "msg": msg, "type": "not_found"})


async def _drop_unknown_refs(
    conn: Connection,
    loc: Loc,
    indexes: list[int],
    calls: list[CallIn],
    errors: dict[int, list[dict[str, Any]]],
    users: set[uuid.UUID],
    contacts: set[uuid.UUID],
) -> tuple[list[int], list[CallIn]]:
    """The calls (and their indexes) left once those naming an unknown or deleted user, or
    an unknown contact, are rejected into `errors`: one query for all the ids named."""
    known = await conn.fetchrow(KNOWN_IDS_SQL, list(users), list(contacts))
    assert known is not None
    unknown_users = users - set(known["users"])
    unknown_contacts = contacts - set(known["contacts"])
    if not (unknown_users or unknown_contacts):
        return indexes, calls
    keep = []
    for index, call in zip(indexes, calls, strict=True):
        where = [*loc, index]
        if call.get("user_id") in unknown_users:
            _reject(errors, index, [*where, "user_id"], "Unknown or deleted user")
        if call.get("contact_id") in unknown_contacts:
            _reject(errors, index, [*where, "contact_id"], "Unknown contact")
        if index not in errors:
            keep.append((index, call))
    return [index for index, _ in keep], [call for _, call in keep]


def _as_stored(calls: list[CallIn], user_id: uuid.UUID, region: str) -> None:
    """Each call made the row as stored: its number normalized, its user and UTC time set.
    A blank spelling (" ", a tab) is no number, stored as "", so that it has the duplicate
    key of "" and of no number at all (migration 0013 re-keyed the ones stored before)."""
    for call in calls:
        hint, raw = call.get("phone_normalized"), call.get("phone_raw")
        kept = raw_or_hint(raw, hint)
        call["phone_raw"] = "" if kept is not None and not kept.strip() else kept
        call["phone_normalized"] = normalize_with_hint(raw, hint, region)
        call["user_id"] = call.get("user_id") or user_id
        call["timestamp"] = call["timestamp"].astimezone(UTC)  # see times.as_utc


async def call_insert_many(
    conn: Connection,
    items: Sequence[object],
    *,
    user_id: uuid.UUID,
    is_admin: bool,
    region: str,
    loc: Loc = ("body",),
    record: SyncRecord | None = None,
) -> CallBatch:
    """Validate and store a batch of calls uploaded by `user_id` in one INSERT, in the
    caller's transaction. With a `record`, that INSERT writes the upload's sync record too
    (also when no call is left to store) and the batch carries its id: one statement, safe
    outside a transaction."""
    loc = tuple(loc)
    indexes, calls, errors = _validate(items, loc)
    if indexes is None:
        indexes = list(range(len(calls)))

    named_users = {u for c in calls if (u := c.get("user_id")) is not None}
    named_users.discard(user_id)
    if not is_admin and (named_users or any(_names_other_user(items[i], user_id) for i in errors)):
        raise Forbidden("Only admins may upload calls of another user")
    named_contacts = {c for call in calls if (c := call.get("contact_id")) is not None}
    if named_users or named_contacts:
        indexes, calls = await _drop_unknown_refs(
            conn, loc, indexes, calls, errors, named_users, named_contacts
        )

    _as_stored(calls, user_id, region)
    # One JSON parameter: orjson and PostgreSQL's JSON parser beat encoding 7 arrays.
    rows = orjson.dumps(calls).decode()
    inserted, sync_id = 0, None
    if record is not None:
        elapsed_ms = (time.perf_counter() - record.started) * 1000
        written = await conn.fetchrow(
            INSERT_RECORDED_SQL,
            rows,
            user_id,
            record.device_id,
            len(calls),
            len(errors),
            elapsed_ms,
        )
        assert written is not None
        sync_id, inserted = written["id"], written["inserted"]
    elif calls:
        inserted = await conn.fetchval(INSERT_SQL, rows)
    rejected = [{"index": i, "errors": errors[i]} for i in sorted(errors)]
    return CallBatch(
        inserted=inserted,
        duplicates=len(calls) - inserted,
        rejected=len(rejected),
        rejected_json=orjson.dumps(rejected).decode(),
        sync_id=sync_id,
    )


def call_count_metrics(batch: CallBatch) -> None:
    """Count an upload's results; called once its work is done (not for a replayed answer)."""
    CALL_RESULTS.labels("inserted").inc(batch.inserted)
    CALL_RESULTS.labels("duplicate").inc(batch.duplicates)
    CALL_RESULTS.labels("rejected").inc(batch.rejected)


async def call_list(
    conn: Connection,
    page: PageRequest,
    *,
    user_id: uuid.UUID | None = None,
    contact_id: uuid.UUID | None = None,
    direction: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> bytes:
    """Calls newest first (timestamp, then id), each with its contact's current name."""
    where: list[str] = []
    params: list[object] = []
    scope = ["calls"]
    kept: list[str] | None = []  # the filters on row_counts, while it can answer them all
    for column, value, kept_column in (
        ("l.user_id =", user_id, "user_id ="),
        ("l.contact_id =", contact_id, None),
        ("l.direction =", direction, "direction ="),
        ('l."timestamp" >=', since, None),
        ('l."timestamp" <', until, None),
    ):
        if value is not None:
            params.append(value)
            where.append(f"{column} ${len(params)}")
            text = value.astimezone(UTC).isoformat() if isinstance(value, datetime) else value
            scope.append(f"{column}{text}")
            if kept is not None and kept_column:
                kept.append(f"{kept_column} ${len(params)}")
            else:
                kept = None
        else:
            scope.append("")
    listing = Listing(
        scope="|".join(str(s) for s in scope),
        from_sql="FROM call_logs l LEFT JOIN contacts c ON c.id = l.contact_id",
        pick_from_sql="FROM call_logs l",  # the filters name call_logs' columns alone
        shape=CALL,
        keys=[SortKey('l."timestamp"', "timestamptz", "timestamp"), SortKey("l.id", "uuid", "id")],
        row_key=['l."timestamp"', "l.id"],  # pk_call_logs (migration 0010)
        where=where,
        params=params,
        descending=True,
        total_sql=None if kept is None else kept_total("calls", kept),
    )
    return await paginate(conn, listing, page)


async def call_list_of_contact(conn: Connection, contact_id: uuid.UUID, page: PageRequest) -> bytes:
    """One contact's calls (a deleted contact keeps its history); NotFound for an unknown id."""
    answer = await call_list(conn, page, contact_id=contact_id)
    # An empty page is the only one that can belong to an unknown id: look it up then.
    if is_empty_page(answer) and not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM contacts WHERE id = $1)", contact_id
    ):
        raise NotFound("No such contact")
    return answer

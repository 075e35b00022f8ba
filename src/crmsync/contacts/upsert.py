"""Contacts: the older-wins upsert, single (POST /contacts) and batch (POST /contacts/batch,
POST /sync). One number is one contact: an upload of a number that has one either
replaces it (strictly older `created_at`) or leaves it, and a tombstone comes back with
its id."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from crmsync.contacts.schemas import BATCH_ADAPTER, CONTACT_ADAPTER, ContactIn, Result
from crmsync.contacts.service import CONTACT_JSON
from crmsync.db import Connection
from crmsync.errors import Loc, ValidationFailed, item_problems
from crmsync.observability import CONTACT_RESULTS
from crmsync.pagination import json_object_sql
from crmsync.phone import normalize_with_hint, raw_or_hint, why_not
from crmsync.times import as_utc

# The older-wins rule, in two statements of the caller's transaction. Never read then
# write: each decision is a WHERE evaluated on the row's latest version under its lock.
# Two, because one upsert cannot tell a revived tombstone from a replaced live row
# without RETURNING old.* (PostgreSQL 18; CI runs 15), and the results need to know.
#
# 1. One upsert of the batch's winner per number, as if that number were new: the first
#    item of a number creates it (no created_at: the server's time), a later item with a
#    strictly older created_at takes its place. A number nobody has is inserted; a
#    tombstone is revived in place (same id, so its calls stay linked). A live row is
#    left alone, but ON CONFLICT DO UPDATE locks it even when its WHERE is false. Calls
#    waiting for a created or revived number are linked in the same statement.
#    Rows go in in number order, so concurrent batches lock them in one order.
#    With $3, also the JSON of the contact created: a single contact that is created needs
#    nothing of the second statement.
UPSERT_SQL = f"""
WITH item AS (
    SELECT * FROM json_to_recordset($1::json)
        AS i(i int, name text, phone_raw text, phone text, created_at timestamptz)
), effective AS (
    SELECT *, CASE WHEN row_number() OVER (PARTITION BY phone ORDER BY i) = 1
                   THEN coalesce(created_at, now()) ELSE created_at END AS eff
    FROM item
), winner AS (
    SELECT DISTINCT ON (phone) phone, name, phone_raw, eff
    FROM effective ORDER BY phone, eff NULLS LAST, i
), created AS (
    INSERT INTO contacts AS c (name, phone_raw, phone_normalized, created_by, created_at)
    SELECT name, phone_raw, phone, $2::uuid, eff FROM winner ORDER BY phone
    ON CONFLICT (phone_normalized) DO UPDATE
        SET name = excluded.name, phone_raw = excluded.phone_raw,
            created_by = excluded.created_by, created_at = excluded.created_at, deleted = false
        WHERE c.deleted
    RETURNING c.id, c.phone_normalized, CASE WHEN $3::bool THEN {CONTACT_JSON}::text END AS json
), linked AS (
    UPDATE call_logs l SET contact_id = created.id FROM created
    WHERE l.contact_id IS NULL AND l.phone_normalized IS NOT NULL
      AND l.phone_normalized = created.phone_normalized
)
SELECT coalesce(array_agg(phone_normalized), '{{}}') AS created, max(json) AS json
FROM created"""

# Both statements find each number's contact by one probe of uq_contacts_phone_normalized
# (a LATERAL subquery, kept from being flattened by its LIMIT): joined as a table, the
# planner hashed all of contacts for a batch it guesses at 100 rows, a sequential scan on
# every POST /contacts (1.4 ms at 20,000 contacts, growing with the table).
#
# 2. Every other number of the batch now has a live row that this transaction holds
#    locked, so this statement's snapshot shows its final state before the batch: an
#    item strictly older than it and than every earlier item of its number replaces it.
#    Each item's result is that rule replayed in request order (window functions); every
#    item answers its number's contact as the batch leaves it.
RESULTS_SQL = f"""
WITH item AS (
    SELECT * FROM json_to_recordset($1::json)
        AS i(i int, name text, phone_raw text, phone text, created_at timestamptz)
), old AS (
    SELECT c.id, c.phone_normalized AS phone, c.created_at
    FROM (SELECT phone FROM item EXCEPT SELECT unnest($3::text[])) p
    CROSS JOIN LATERAL (SELECT * FROM contacts c WHERE c.phone_normalized = p.phone LIMIT 1) c
), winner AS (
    SELECT DISTINCT ON (o.id) o.id, it.name, it.phone_raw, it.created_at
    FROM item it JOIN old o USING (phone)
    WHERE it.created_at < o.created_at
    ORDER BY o.id, it.created_at, it.i
), replaced AS (
    UPDATE contacts c
    SET name = w.name, phone_raw = w.phone_raw, created_by = $2::uuid, created_at = w.created_at
    FROM winner w WHERE c.id = w.id
    RETURNING c.phone_normalized AS phone, {CONTACT_JSON} AS json
), final AS (  -- keyed by distinct number, so the planner hash-joins the CTEs
    SELECT p.phone, coalesce(r.json, {CONTACT_JSON}) AS json
    FROM (SELECT DISTINCT phone FROM item) p
    CROSS JOIN LATERAL (SELECT * FROM contacts c WHERE c.phone_normalized = p.phone LIMIT 1) c
    LEFT JOIN replaced r ON r.phone = p.phone
), effective AS (
    SELECT it.i, it.phone, it.created_at, o.created_at AS base,
           o.id IS NULL AND row_number() OVER (PARTITION BY it.phone ORDER BY it.i) = 1
               AS creates
    FROM item it LEFT JOIN old o USING (phone)
), judged AS (
    SELECT i, phone, CASE
        WHEN creates THEN 'created'
        WHEN created_at < least(base, min(CASE WHEN creates THEN coalesce(created_at, now())
                                               ELSE created_at END)
                                      OVER (PARTITION BY phone ORDER BY i
                                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING))
        THEN 'replaced'
        ELSE 'existing' END AS result
    FROM effective
), answer AS (
    SELECT j.i, j.result, CASE WHEN $5::bool
        THEN {json_object_sql([("index", "j.i"), ("result", "j.result"), ("contact", "f.json")])}
        ELSE {json_object_sql([("result", "j.result"), ("contact", "f.json")])}
        END AS json
    FROM judged j JOIN final f USING (phone)
    UNION ALL
    SELECT (x ->> 'index')::int, 'rejected', x FROM json_array_elements($4::json) x
)
SELECT '[' || coalesce(string_agg(json::text, ',' ORDER BY i), '') || ']' AS results,
       count(*) FILTER (WHERE result = 'created') AS created,
       count(*) FILTER (WHERE result = 'replaced') AS replaced,
       count(*) FILTER (WHERE result = 'existing') AS existing,
       count(*) FILTER (WHERE result = 'rejected') AS rejected
FROM answer"""


@dataclass(frozen=True)
class ContactBatch:
    results_json: str  # JSON array, request order: {index, result, contact} | {index, result: "rejected", errors}
    counts: dict[str, int]  # created, replaced, existing, rejected


@dataclass(frozen=True)
class ContactUpsert:
    result: Result
    json: str  # {"result", "contact"}


def _validate(
    items: Sequence[object], loc: tuple[str | int, ...], region: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to store, rejected results). The whole list is validated in one call; only a
    list with an invalid item is gone through item by item to tell which ones."""
    valid: list[tuple[int, ContactIn]] = []
    rejected: list[dict[str, Any]] = []
    try:
        valid = list(enumerate(BATCH_ADAPTER.validate_python(items)))
    except ValidationError:
        for index, item in enumerate(items):
            try:
                valid.append((index, CONTACT_ADAPTER.validate_python(item)))
            except ValidationError as exc:
                errors = item_problems(exc, (*loc, index))
                rejected.append({"index": index, "result": "rejected", "errors": errors})
    rows: list[dict[str, Any]] = []
    for index, contact in valid:
        row = _row(
            index,
            name=contact["name"],
            raw=contact["phone_raw"],
            hint=contact.get("phone_normalized"),
            created_at=contact.get("created_at"),
            region=region,
        )
        if row is None:
            why = why_not(contact["phone_raw"], contact.get("phone_normalized"), region)
            error = {"loc": [*loc, index, "phone_raw"], "msg": why, "type": "phone"}
            rejected.append({"index": index, "result": "rejected", "errors": [error]})
        else:
            rows.append(row)
    return rows, rejected


def _row(
    index: int, *, name: str, raw: str, hint: str | None, created_at: datetime | None, region: str
) -> dict[str, Any] | None:
    """A contact as _upsert takes it; None when its number is no possible phone number."""
    phone = normalize_with_hint(raw, hint, region)
    if phone is None:
        return None
    return {
        "i": index,
        "name": name,
        "phone_raw": raw_or_hint(raw, hint),
        "phone": phone,
        "created_at": as_utc(created_at),
    }


async def _upsert(
    conn: Connection,
    rows: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    *,
    user_id: uuid.UUID,
    indexed: bool,
) -> tuple[str, dict[str, int]]:
    # The row locks taken by the first statement must last until the second has run.
    assert conn.is_in_transaction(), "contacts are upserted inside a transaction"
    rejected.sort(key=lambda r: int(r["index"]))
    rejected_json = orjson.dumps(rejected).decode()
    if not rows:
        counts = {"created": 0, "replaced": 0, "existing": 0, "rejected": len(rejected)}
        return rejected_json, counts
    rows_json = orjson.dumps(rows).decode()
    created = await conn.fetchval(UPSERT_SQL, rows_json, user_id, False)
    return await _results(conn, rows_json, created, rejected_json, user_id=user_id, indexed=indexed)


async def _results(
    conn: Connection,
    rows_json: str,
    created: list[str],
    rejected_json: str,
    *,
    user_id: uuid.UUID,
    indexed: bool,
) -> tuple[str, dict[str, int]]:
    record = await conn.fetchrow(RESULTS_SQL, rows_json, user_id, created, rejected_json, indexed)
    assert record is not None
    counts = {k: int(record[k]) for k in ("created", "replaced", "existing", "rejected")}
    return str(record["results"]), counts


async def contact_upsert_many(
    conn: Connection,
    items: Sequence[object],
    *,
    user_id: uuid.UUID,
    region: str,
    loc: Loc = ("body",),
) -> ContactBatch:
    """Validate and store uploaded contacts by the older-wins rule, in the caller's
    transaction; items of one number are resolved in request order. Writes no sync record."""
    rows, rejected = _validate(items, tuple(loc), region)
    results, counts = await _upsert(conn, rows, rejected, user_id=user_id, indexed=True)
    return ContactBatch(results_json=results, counts=counts)


async def contact_upsert(
    conn: Connection,
    *,
    name: str,
    phone_raw: str,
    phone_hint: str | None,
    created_at: datetime | None,
    user_id: uuid.UUID,
    region: str,
) -> ContactUpsert:
    """One validated contact by the older-wins rule (POST /contacts), in the caller's
    transaction."""
    row = _row(0, name=name, raw=phone_raw, hint=phone_hint, created_at=created_at, region=region)
    if row is None:
        why = why_not(phone_raw, phone_hint, region)
        raise ValidationFailed.one(["body", "phone_raw"], why, "phone")
    assert conn.is_in_transaction(), "contacts are upserted inside a transaction"
    rows_json = orjson.dumps([row]).decode()
    upserted = await conn.fetchrow(UPSERT_SQL, rows_json, user_id, True)
    assert upserted is not None
    if upserted["json"] is not None:  # a new number, or a deleted contact's revived
        contact = upserted["json"]
        return ContactUpsert(result="created", json=f'{{"result":"created","contact":{contact}}}')
    results, counts = await _results(
        conn, rows_json, upserted["created"], "[]", user_id=user_id, indexed=False
    )
    result: Result = next(r for r in ("created", "replaced", "existing") if counts[r])
    return ContactUpsert(result=result, json=results[1:-1])


def contact_count_metrics(counts: dict[str, int]) -> None:
    """Count an upload's results; called once its work is done (not for a replayed answer)."""
    for result, count in counts.items():
        if count:
            CONTACT_RESULTS.labels(result).inc(count)

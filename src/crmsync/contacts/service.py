"""Contacts: reads, edits, soft deletes and the changes feed (the older-wins upsert is in
upsert.py). One number is one contact: phone_normalized is unique over all rows,
tombstones included, so a deleted contact keeps its calls and comes back with its id."""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import phonenumbers

from crmsync.db import Connection
from crmsync.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PhoneTaken,
    PreconditionFailed,
    ServiceUnavailable,
    ValidationFailed,
)
from crmsync.pagination import (
    Listing,
    PageRequest,
    Shape,
    SortKey,
    decode_cursor,
    encode_cursor,
    kept_total,
    paginate,
)
from crmsync.phone import normalize, normalize_with_hint, raw_or_hint, why_not

CONTACT = Shape(
    (
        ("id", "c.id::text"),
        ("name", "c.name"),
        ("phone_raw", "c.phone_raw"),
        ("phone_normalized", "c.phone_normalized"),
        ("created_by", "c.created_by::text"),
        ("created_at", "api_time(c.created_at)"),
        ("updated_at", "api_time(c.updated_at)"),
        ("deleted", "c.deleted"),
        # The ETag header's value (contacts.routes.etag), in every answer holding a contact:
        # a phone keeps it from the changes feed or an upload for its next If-Match.
        ("etag", """'"' || c.change_seq || '"'"""),
    )
)
CONTACT_JSON = CONTACT.object_sql


@dataclass(frozen=True)
class ContactVersion:
    json: str  # the contact
    version: int  # change_seq: moves on every write, so it makes the ETag


# Reads


async def contact_list(conn: Connection, page: PageRequest) -> bytes:
    listing = Listing(
        scope="contacts",
        from_sql="FROM contacts c",
        shape=CONTACT,
        where=["NOT c.deleted"],
        keys=[SortKey("c.name", "text", "name"), SortKey("c.id", "uuid", "id")],
        total_sql=kept_total("contacts"),
    )
    return await paginate(conn, listing, page)


def phone_digits(q: str) -> str | None:
    """The digits to look for when q is mostly digits: at least 3, making up at least 60%
    of its non-space characters."""
    digits = phonenumbers.normalize_digits_only(q)  # any script's digits, as ASCII
    significant = len("".join(q.split()))
    if len(digits) >= 3 and len(digits) >= 0.6 * significant:
        return digits
    return None


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def contact_search(conn: Connection, page: PageRequest, *, q: str) -> bytes:
    """Live contacts whose E.164 digits contain q's digits (q mostly digits), ordered by
    name; else whose name contains q (any case), names starting with q first. q is taken
    in NFC, as names are stored."""
    q = unicodedata.normalize("NFC", q)
    digits = phone_digits(q)
    if digits is not None:
        listing = Listing(
            scope=f"contacts/search|phone|{digits}",
            from_sql="FROM contacts c",
            shape=CONTACT,
            where=["NOT c.deleted", "c.phone_normalized LIKE $1"],
            params=[f"%{digits}%"],
            keys=[SortKey("c.name", "text", "name"), SortKey("c.id", "uuid", "id")],
            sorted_after_match=True,
        )
    else:
        listing = Listing(
            scope=f"contacts/search|name|{q}",
            from_sql="FROM contacts c",
            shape=CONTACT,
            # $1 is '%q%' (served by the trigram index); without its leading '%' it is the
            # prefix pattern 'q%' that ranks name prefixes first.
            where=["NOT c.deleted", "c.name ILIKE $1"],
            params=[f"%{_like_escape(q)}%"],
            keys=[
                SortKey("(CASE WHEN c.name ILIKE substr($1, 2) THEN 0 ELSE 1 END)", "int"),
                SortKey("c.name", "text", "name"),
                SortKey("c.id", "uuid", "id"),
            ],
            sorted_after_match=True,
        )
    return await paginate(conn, listing, page)


async def contact_lookup(conn: Connection, *, phone: str, region: str) -> str:
    """The live contact with this number in any spelling (caller ID)."""
    normalized = normalize(phone, region)
    if normalized is None:
        why = why_not(phone, None, region)
        if phone[:1] == " " and phone.lstrip()[:1].isdigit():  # +44... sent unencoded
            why += "; a '+' in a URL reads as a space: send it as %2B"
        raise ValidationFailed.one(["query", "phone"], why, "phone")
    json: str | None = await conn.fetchval(
        f"SELECT {CONTACT_JSON}::text FROM contacts c"
        " WHERE c.phone_normalized = $1 AND NOT c.deleted",
        normalized,
    )
    if json is None:
        raise NotFound("No contact has that number")
    return json


async def contact_get(conn: Connection, contact_id: uuid.UUID) -> ContactVersion:
    row = await conn.fetchrow(
        f"SELECT {CONTACT_JSON}::text AS json, c.change_seq FROM contacts c"
        " WHERE c.id = $1 AND NOT c.deleted",
        contact_id,
    )
    if row is None:
        raise NotFound("No such contact")
    return ContactVersion(row["json"], row["change_seq"])


# Writes to one contact. Each is one statement: the checks (live, owner or admin, If-Match,
# number free) are in its WHERE, evaluated on the row's latest version, so a concurrent
# write either happens before (and the check sees it) or waits.

# A PUT that changes nothing writes nothing: the contact keeps its ETag, updated_at and
# place in the changes feed (`same` answers it), so other phones' tags stay good.
# The contact's own spelling sent again (an app that sends the whole contact back) is no
# change of number, and is not read again: read without the hint it was made with, or
# under another default region, it could give another number ("04 72 10 30 30", made with
# "+33472103030", read in the US) or none (a local-only number stored before migration
# 0012). That too is decided on the row's latest version, in the UPDATE: decided from an
# earlier read, a PUT racing another PUT of the number could answer 200 with the other's
# number and change nothing. A new spelling that is no number ($4 null) changes nothing,
# and the caller answers 422.
UPDATE_SQL = f"""
WITH cur AS (
    SELECT c.deleted, c.created_by, c.change_seq, c.phone_raw FROM contacts c WHERE c.id = $1
), taken AS (
    SELECT {CONTACT_JSON}::text AS json FROM contacts c
    WHERE $4::text IS NOT NULL AND c.phone_normalized = $4::text AND c.id <> $1
      AND $3::text IS DISTINCT FROM (SELECT phone_raw FROM cur)
), upd AS (
    UPDATE contacts c SET name = coalesce($2::text, c.name),
        phone_raw = coalesce($3::text, c.phone_raw),
        phone_normalized = CASE WHEN c.phone_raw = coalesce($3::text, c.phone_raw)
                                THEN c.phone_normalized ELSE $4::text END
    WHERE c.id = $1 AND NOT c.deleted AND ($5::bool OR c.created_by = $6::uuid)
      AND ($7::bigint[] IS NULL OR c.change_seq = ANY($7::bigint[]))
      AND NOT EXISTS (SELECT 1 FROM taken)
      AND (c.phone_raw = coalesce($3::text, c.phone_raw) OR $4::text IS NOT NULL)
      AND (c.name <> coalesce($2::text, c.name) OR c.phone_raw <> coalesce($3::text, c.phone_raw))
    RETURNING c.id, c.phone_normalized, {CONTACT_JSON}::text AS json, c.change_seq
), same AS (
    SELECT {CONTACT_JSON}::text AS json, c.change_seq FROM contacts c
    WHERE c.id = $1 AND NOT c.deleted AND ($5::bool OR c.created_by = $6::uuid)
      AND ($7::bigint[] IS NULL OR c.change_seq = ANY($7::bigint[]))
      AND c.name = coalesce($2::text, c.name) AND c.phone_raw = coalesce($3::text, c.phone_raw)
), linked AS (
    UPDATE call_logs l SET contact_id = u.id FROM upd u
    WHERE $4::text IS NOT NULL AND l.contact_id IS NULL AND l.phone_normalized IS NOT NULL
      AND l.phone_normalized = u.phone_normalized
)
SELECT coalesce((SELECT json FROM upd), (SELECT json FROM same)) AS json,
       coalesce((SELECT change_seq FROM upd), (SELECT change_seq FROM same)) AS version,
       (SELECT json FROM taken LIMIT 1) AS taken, cur.deleted, cur.created_by,
       cur.change_seq AS current_version, cur.phone_raw AS current_phone_raw
FROM (SELECT 1) one LEFT JOIN cur ON true"""

DELETE_SQL = """
WITH cur AS (
    SELECT c.deleted, c.created_by, c.change_seq FROM contacts c WHERE c.id = $1
), upd AS (
    UPDATE contacts c SET deleted = true
    WHERE c.id = $1 AND NOT c.deleted AND ($2::bool OR c.created_by = $3::uuid)
      AND ($4::bigint[] IS NULL OR c.change_seq = ANY($4::bigint[]))
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM upd) AS done, NULL::text AS taken, cur.deleted, cur.created_by,
       cur.change_seq AS current_version
FROM (SELECT 1) one LEFT JOIN cur ON true"""


def _refusal(
    row: Any, *, user_id: uuid.UUID, is_admin: bool, if_match: Sequence[int] | None
) -> Exception | None:
    """Why a write to one contact changed nothing, in the order a client should hear it;
    None when nothing refused it (the row changed between the statement's snapshot and
    its write, and no If-Match was given): the statement is to be run again."""
    if row["deleted"] is None or row["deleted"]:
        return NotFound("No such contact")
    if not is_admin and row["created_by"] != user_id:
        return Forbidden("Only the contact's owner or an admin may change it")
    if if_match is not None and row["current_version"] not in if_match:
        return PreconditionFailed("The contact changed since that ETag")
    if row["taken"] is not None:
        return PhoneTaken("Another contact has that number", contact=orjson.Fragment(row["taken"]))
    # The row changed between this statement's snapshot and its write.
    if if_match is not None:
        return PreconditionFailed("The contact changed since that ETag")
    return None


ATTEMPTS = 3
RACED = "Concurrent writes to this contact kept conflicting; nothing was changed; retry"


async def contact_update(
    conn: Connection,
    contact_id: uuid.UUID,
    *,
    name: str | None,
    phone_raw: str | None,
    user_id: uuid.UUID,
    is_admin: bool,
    if_match: Sequence[int] | None,
    region: str,
    phone_hint: str | None = None,
) -> ContactVersion:
    """Change a live contact's name or number (owner or admin). if_match: the versions the
    client's If-Match names (None: last write wins). phone_hint: an E.164 hint for a new
    phone_raw, as in POST."""
    phone = None
    if phone_raw is not None:
        phone_raw = raw_or_hint(phone_raw, phone_hint)  # a blank one: the hint, as in POST
        phone = normalize_with_hint(phone_raw, phone_hint, region)
    versions = None if if_match is None else list(if_match)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                row = await conn.fetchrow(
                    UPDATE_SQL, contact_id, name, phone_raw, phone, is_admin, user_id, versions
                )
            except asyncpg.DeadlockDetectedError:
                # The new number's index entry was awaited while this row was locked, and
                # the writer of that entry (a batch) waited for this row. The statement
                # was rolled back whole (its own transaction), so it is simply run again.
                if attempt == ATTEMPTS or conn.is_in_transaction():
                    raise
                continue
            assert row is not None
            if row["json"] is not None:
                return ContactVersion(row["json"], row["version"])
            if phone_raw is not None and phone is None and phone_raw != row["current_phone_raw"]:
                why = why_not(phone_raw, phone_hint, region)
                raise ValidationFailed.one(["body", "phone_raw"], why, "phone")
            refusal = _refusal(row, user_id=user_id, is_admin=is_admin, if_match=if_match)
            if refusal is not None:
                raise refusal
    except asyncpg.UniqueViolationError:
        # Another transaction gave the number to a contact after this one looked.
        taken = await conn.fetchval(
            f"SELECT {CONTACT_JSON}::text FROM contacts c WHERE c.phone_normalized = $1", phone
        )
        raise PhoneTaken(
            "Another contact has that number", contact=orjson.Fragment(taken or "null")
        ) from None
    raise ServiceUnavailable(RACED, retry_after=1)


async def contact_delete(
    conn: Connection,
    contact_id: uuid.UUID,
    *,
    user_id: uuid.UUID,
    is_admin: bool,
    if_match: Sequence[int] | None,
) -> None:
    """Soft delete (owner or admin): the row stays as a tombstone the changes feed reports."""
    versions = None if if_match is None else list(if_match)
    for _ in range(ATTEMPTS):
        row = await conn.fetchrow(DELETE_SQL, contact_id, is_admin, user_id, versions)
        assert row is not None
        if row["done"]:
            return
        refusal = _refusal(row, user_id=user_id, is_admin=is_admin, if_match=if_match)
        if refusal is not None:
            raise refusal
    raise ServiceUnavailable(RACED, retry_after=1)


# The changes feed.
#
# A write's feed position is (change_xid, change_seq): its transaction's id, then a
# sequence number, both set by the contacts_track_change trigger. Positions are not
# committed in order: a transaction that started earlier (smaller xid) can commit after a
# pull has passed a later one. So a pull returns only rows whose transaction is below the
# xmin of its own snapshot: every transaction below xmin has finished, so nothing can
# still appear in that prefix, and a cursor inside it never skips a change. A row that a
# later transaction writes again moves out of the prefix to a position after every
# cursor handed out so far, and reappears there at its latest state.
#
# Transaction ids count up in one PostgreSQL cluster only. A backup restored into another
# (a new machine after a disk died) starts with restore moving the counter past the
# restored rows' positions, but a device may hold a cursor from the old cluster further
# on still: it would skip every change the new cluster writes below that position. A
# backup restored into the same cluster puts rows back at positions before the cursors
# handed out since the backup: a device would never learn that a contact it pulled later
# is gone or changed back. So a cursor names its origin, the cluster
# (pg_control_system's system_identifier) and the contacts table (its oid, new in every
# restore), and one from another origin restarts the device's pull from the beginning:
# sent again, nothing missed.

CHANGES_SCOPE = "contacts/changes"
_BEGINNING = ("0", "0")


# `crmsync restore` leaves this as the contacts table's comment.
RESTORED_MARK = "crmsync: restored from a backup"


@dataclass(frozen=True)
class Feed:
    """What a changes cursor is signed with, the origin its positions belong to, and
    whether the contacts were ever restored from a backup."""

    key: bytes
    origin: str
    restored: bool = False


async def contact_feed(conn: Connection, key: bytes) -> Feed:
    """The origin is `<cluster>/<contacts table>`: the cluster's identity, made by initdb
    ("0" where a managed service hides it: cursors then cannot tell clusters apart), and
    the oid of the contacts table, which every restore creates anew."""
    row = await conn.fetchrow(
        "SELECT 'contacts'::regclass::oid::text AS oid,"
        " obj_description('contacts'::regclass, 'pg_class') IS NOT DISTINCT FROM $1 AS restored",
        RESTORED_MARK,
    )
    assert row is not None
    try:
        cluster = await conn.fetchval("SELECT system_identifier::text FROM pg_control_system()")
    except asyncpg.InsufficientPrivilegeError:
        cluster = None
    return Feed(key, f"{cluster or '0'}/{row['oid']}", row["restored"])


# Plain columns, the JSON made by orjson (see pagination.Shape).
CHANGES_SQL = f"""
SELECT {CONTACT.columns_sql}, c.change_xid AS xid, c.change_seq AS seq
FROM contacts c
WHERE (c.change_xid, c.change_seq) > ($1::bigint, $2::bigint)
  AND c.change_xid < (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint)
ORDER BY c.change_xid, c.change_seq
LIMIT $3 + 1"""

# `any`: whether this snapshot sees any contact at all (min() is one probe of
# ix_contacts_change, not a sequential scan).
HEAD_SQL = """
SELECT (SELECT min(change_xid) FROM contacts) IS NOT NULL AS any,
       last.change_xid AS xid, last.change_seq AS seq
FROM (SELECT 1) one LEFT JOIN LATERAL (
    SELECT c.change_xid, c.change_seq FROM contacts c
    WHERE c.change_xid < (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint)
    ORDER BY c.change_xid DESC, c.change_seq DESC LIMIT 1
) last ON true"""


@dataclass(frozen=True)
class ChangesPage:
    items_json: bytes  # JSON array of contacts, oldest change first
    next_cursor: str
    has_more: bool
    restarted: bool = False  # the cursor was made before a restore: from the beginning

    def json(self, *, limit: int | None = None) -> bytes:
        """The page as the API answers it: `{items, [limit,] next_cursor, has_more,
        restarted}`."""
        return b"".join(
            (
                b'{"items":',
                self.items_json,
                b"" if limit is None else b',"limit":%d' % limit,
                b',"next_cursor":',
                orjson.dumps(self.next_cursor),
                b',"has_more":true' if self.has_more else b',"has_more":false',
                b',"restarted":true}' if self.restarted else b',"restarted":false}',
            )
        )


def _changes_position(cursor: str | None, feed: Feed) -> tuple[int, int, bool]:
    """Where a pull resumes, and whether it restarts: the cursor was made elsewhere."""
    if not cursor:  # none, or empty (`?cursor=`): from the beginning
        return 0, 0, False
    values = decode_cursor(feed.key, CHANGES_SCOPE, cursor, (3, 2))
    # Cursors made before origins named the contacts table name their cluster alone, or
    # (older still) nothing: honoured where the contacts were never restored, so that
    # this version's start is no new pull of every contact for every device.
    made_in = values.pop(0) if len(values) == 3 else None
    if made_in != feed.origin and (
        feed.restored or made_in not in (None, feed.origin.partition("/")[0])
    ):
        return 0, 0, True  # made elsewhere: see above
    try:
        return int(values[0]), int(values[1]), False
    except ValueError:
        raise BadRequest("Invalid cursor") from None


def _changes_cursor(feed: Feed, xid: object, seq: object) -> str:
    return encode_cursor(feed.key, CHANGES_SCOPE, [feed.origin, str(xid), str(seq)])


async def contact_changes_page(
    conn: Connection, *, cursor: str | None, limit: int, feed: Feed
) -> ChangesPage:
    """Contacts written after `cursor` (None: from the beginning), oldest change first."""
    xid, seq, restarted = _changes_position(cursor, feed)
    rows = await conn.fetch(CHANGES_SQL, xid, seq, limit)
    items = rows[:limit]
    if items:
        xid, seq = items[-1]["xid"], items[-1]["seq"]
    return ChangesPage(
        items_json=CONTACT.dumps(items),
        next_cursor=_changes_cursor(feed, xid, seq),
        has_more=len(rows) > limit,
        restarted=restarted,
    )


async def contact_changes_head(conn: Connection, *, feed: Feed) -> str | None:
    """A cursor at the current end of the changes feed; None when there are no contacts."""
    row = await conn.fetchrow(HEAD_SQL)
    assert row is not None
    if not row["any"]:
        return None
    if row["xid"] is None:
        return _changes_cursor(feed, *_BEGINNING)
    return _changes_cursor(feed, row["xid"], row["seq"])

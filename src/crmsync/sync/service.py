"""Sync records: one per upload, written in the upload's own transaction."""

from __future__ import annotations

import uuid
from typing import Any, Literal

import orjson

from crmsync.db import Connection
from crmsync.pagination import Listing, PageRequest, Shape, SortKey, paginate

SyncKind = Literal["contacts", "calls", "sync"]


async def sync_record_create(
    conn: Connection,
    *,
    user_id: uuid.UUID,
    kind: SyncKind,
    synced_contacts: int,
    synced_calls: int,
    details: dict[str, Any],
) -> uuid.UUID:
    sync_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO sync_audit (user_id, kind, synced_contacts, synced_calls, details)
           VALUES ($1, $2, $3, $4, $5::text::jsonb) RETURNING id""",
        user_id,
        kind,
        synced_contacts,
        synced_calls,
        orjson.dumps(details).decode(),
    )
    return sync_id


SYNC = Shape(
    (
        ("id", "s.id::text"),
        ("user_id", "s.user_id::text"),
        ("synced_contacts", "s.synced_contacts"),
        ("synced_calls", "s.synced_calls"),
        ("created_at", "api_time(s.created_at)"),
        ("kind", "s.kind"),
        ("details", "s.details"),
    ),
    nested=frozenset({"details"}),
)


async def sync_list(conn: Connection, page: PageRequest, *, user_id: uuid.UUID | None) -> bytes:
    """Sync records newest first (created_at, then id): one user's, or everyone's."""
    listing = Listing(
        scope=f"sync|{user_id or ''}",
        from_sql="FROM sync_audit s",
        shape=SYNC,
        keys=[SortKey("s.created_at", "timestamptz"), SortKey("s.id", "uuid")],
        where=["s.user_id = $1"] if user_id else [],
        params=[user_id] if user_id else [],
        descending=True,
    )
    return await paginate(conn, listing, page)


async def sync_state(conn: Connection, *, user_id: uuid.UUID, contacts_cursor: str | None) -> str:
    """Where the user's next upload and pull start, as the JSON of GET /sync/state."""
    state: str = await conn.fetchval(
        """SELECT json_build_object(
               'server_time', api_time(clock_timestamp()),
               'last_call_timestamp', (SELECT api_time(max("timestamp")) FROM call_logs
                                        WHERE user_id = $1),
               'last_sync_at', (SELECT api_time(max(created_at)) FROM sync_audit
                                 WHERE user_id = $1),
               'contacts_cursor', $2::text)::text""",
        user_id,
        contacts_cursor,
    )
    return state

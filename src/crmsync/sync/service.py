"""Sync records: one per upload, written in the upload's own transaction."""

from __future__ import annotations

import uuid
from typing import Any, Literal

import orjson

from crmsync.db import Connection

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

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from crmsync.calls.schemas import RejectedItem, calls_body_schema
from crmsync.contacts.schemas import ContactOut, ContactResultOut, contacts_body_schema
from crmsync.pagination import PageOut

SYNC_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "contacts": {**contacts_body_schema(), "minItems": 0},
        "calls": {**calls_body_schema(), "minItems": 0},
        "cursor": {
            "type": ["string", "null"],
            "description": "next_cursor of the last changes applied; none = from the beginning",
        },
    },
}


class SyncRecordOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    synced_contacts: int = Field(description="Contacts created or replaced")
    synced_calls: int = Field(description="Calls inserted")
    created_at: datetime
    kind: Literal["contacts", "calls", "sync"]
    details: dict[str, int] = Field(
        description="Counts: created, replaced, existing, rejected, inserted, duplicates, "
        "rejected_calls as applicable"
    )
    device_id: str | None = Field(description="The upload's X-Device-Id (first 200 characters)")
    elapsed_ms: float | None = Field(description="How long the upload's work took")


class SyncPage(PageOut[SyncRecordOut]):
    pass


class SyncStateOut(BaseModel):
    server_time: datetime
    last_call_timestamp: datetime | None = Field(description="The caller's newest stored call")
    last_sync_at: datetime | None = Field(description="The caller's last upload")
    contacts_cursor: str | None = Field(
        description="The end of the contacts changes feed now; null when there are no contacts"
    )


class SyncCallsOut(BaseModel):
    inserted: int
    duplicates: int
    rejected: list[RejectedItem]


class SyncChangesOut(BaseModel):
    items: list[ContactOut] = Field(description="Contacts, as GET /contacts/changes")
    next_cursor: str
    has_more: bool
    restarted: bool = Field(
        default=False,
        description="As in GET /contacts/changes. Absent (false) in the replay of an answer "
        "given before servers sent it.",
    )


class SyncOut(BaseModel):
    sync_id: uuid.UUID
    contacts: list[ContactResultOut] = Field(description="Results as POST /contacts/batch")
    calls: SyncCallsOut
    changes: SyncChangesOut

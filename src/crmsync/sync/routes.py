from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response

from crmsync.calls.schemas import MAX_CALLS, calls_body_schema
from crmsync.calls.service import CallBatch, call_count_metrics, call_insert_many
from crmsync.contacts.schemas import MAX_BATCH, contacts_body_schema
from crmsync.contacts.service import contact_changes_head, contact_changes_page
from crmsync.contacts.upsert import ContactBatch, contact_count_metrics, contact_upsert_many
from crmsync.deps import (
    AppSettings,
    Conn,
    CurrentUser,
    DeviceId,
    IdempotencyKey,
    JSONBytes,
    Page,
    RawBody,
    Route,
    Tx,
)
from crmsync.errors import Forbidden, ValidationFailed
from crmsync.sync import service
from crmsync.sync.schemas import SyncOut, SyncPage, SyncStateOut

router = APIRouter(prefix="/sync", tags=["sync"], route_class=Route)

CHANGES_LIMIT = 200

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


def _optional_batch(payload: dict[str, Any], field: str, max_items: int) -> list[object]:
    value = payload.get(field)
    if value is None:
        return []
    return service.batch_items(value, loc=("body", field), max_items=max_items, allow_empty=True)


@router.get(
    "",
    response_model=SyncPage,
    summary="List sync records",
    description="Newest first (created_at, then id). Admins see everyone's, or one user's "
    "with user_id; others see only their own (naming another user_id is 403).",
)
async def list_sync_records(
    user: CurrentUser, conn: Conn, page: Page, user_id: uuid.UUID | None = None
) -> Response:
    if not user.is_admin:
        if user_id is not None and user_id != user.id:
            raise Forbidden("Only admins may see other users' sync records")
        user_id = user.id
    return JSONBytes(await service.sync_list(conn, page, user_id=user_id))


@router.get(
    "/state",
    response_model=SyncStateOut,
    summary="Where the next sync starts",
    description="The server's time, the caller's newest stored call and last upload, and "
    "the end of the contacts changes feed (null when there are no contacts).",
)
async def sync_state(request: Request, user: CurrentUser, conn: Conn) -> Response:
    head = await contact_changes_head(conn, feed=request.app.state.changes_feed)
    return JSONBytes(await service.sync_state(conn, user_id=user.id, contacts_cursor=head))


@router.post(
    "",
    response_model=SyncOut,
    summary="Upload contacts and calls, pull contact changes",
    description=f"One round trip: contacts (at most {MAX_BATCH}, as POST /contacts/batch) "
    f"and calls (at most {MAX_CALLS}, as POST /calls) stored in one transaction, then up to "
    f"{CHANGES_LIMIT} contact changes after `cursor`. Writes one sync record.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SYNC_BODY_SCHEMA}},
        }
    },
)
async def sync(
    request: Request,
    body: RawBody,
    user: CurrentUser,
    conn: Tx,
    settings: AppSettings,
    device_id: DeviceId,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    async def work() -> service.Upload:
        payload = service.parse_json(body, max_items=MAX_BATCH + MAX_CALLS)
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
                conn,
                contact_items,
                user_id=user.id,
                region=settings.default_region,
                loc=("body", "contacts"),
            )
            if contact_items
            else ContactBatch(
                results_json="[]",
                counts={"created": 0, "replaced": 0, "existing": 0, "rejected": 0},
            )
        )
        calls = (
            await call_insert_many(
                conn,
                call_items,
                user_id=user.id,
                is_admin=user.is_admin,
                region=settings.default_region,
                loc=("body", "calls"),
            )
            if call_items
            else CallBatch(inserted=0, duplicates=0, rejected=0, rejected_json="[]")
        )
        changes = await contact_changes_page(
            conn, cursor=cursor, limit=CHANGES_LIMIT, feed=request.app.state.changes_feed
        )
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

        return service.Upload(
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

    uploaded = await service.upload(
        conn,
        user_id=user.id,
        kind="sync",
        key=idempotency_key,
        device_id=device_id,
        request=("POST", request.url.path, body),
        work=work,
    )
    return JSONBytes(uploaded.body, status_code=uploaded.status, headers=uploaded.headers)

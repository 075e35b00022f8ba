from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response

from crmsync.calls.schemas import MAX_CALLS
from crmsync.contacts.schemas import MAX_BATCH
from crmsync.contacts.service import contact_changes_head
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
from crmsync.errors import Forbidden
from crmsync.sync import service
from crmsync.sync.schemas import SYNC_BODY_SCHEMA, SyncOut, SyncPage, SyncStateOut

router = APIRouter(prefix="/sync", tags=["sync"], route_class=Route)


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
    f"{service.CHANGES_LIMIT} contact changes after `cursor`. Writes one sync record.",
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
        return await service.sync_work(
            conn,
            body,
            user_id=user.id,
            is_admin=user.is_admin,
            region=settings.default_region,
            feed=request.app.state.changes_feed,
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
